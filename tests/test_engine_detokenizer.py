from tiermoe.engine.detokenizer import TextStream

from .conftest import TOKENIZER


def feed(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(TOKENIZER, stop)
    pieces = []
    for token in TOKENIZER.encode(text, add_special_tokens=False):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_text_is_the_decoded_tokens():
    pieces, stream = feed("Hello, how are you today?", [])
    assert "".join(pieces) == "Hello, how are you today?" and not stream.stopped


def test_stop_string_cuts_the_output_and_is_never_emitted():
    pieces, stream = feed("The capital is Paris. The quick fox", ["Paris"])
    assert stream.stopped
    assert "".join(pieces) == "The capital is "
    assert not any("P" in p for p in pieces)  # a possible start of the stop string is held back


def test_held_back_prefix_is_released_when_it_cannot_match():
    pieces, stream = feed("ab cd", ["b x"])
    assert "".join(pieces) == "ab cd" and not stream.stopped
