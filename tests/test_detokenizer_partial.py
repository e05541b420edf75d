"""TextStream at the end of a stream cut mid-character (max_tokens), and stop strings next to
unfinished characters. Real byte-level BPEs: the conftest one, whose merges are all ASCII (so a
Japanese character is three one-byte tokens), and one trained with Japanese text, whose merges cross
character boundaries (a token can end one character and begin the next, as Qwen's do)."""

from __future__ import annotations

import random

import pytest

from tiermoe.bench.synth_tokenizer import CHATML_CORPUS as CORPUS
from tiermoe.bench.synth_tokenizer import CHATML_SPECIAL_TOKENS as SPECIAL_TOKENS
from tiermoe.bench.synth_tokenizer import STYLES, train_bpe, wrap
from tiermoe.engine.detokenizer import TextStream

from .conftest import TOKENIZER

JAPANESE = "今日はとてもしい天気です。明日もとても楽しい一日になるでしょう。私は日本語を少し話します。"
JA_TOKENIZER = wrap(
    train_bpe([CORPUS, JAPANESE] * 4, 320, dict(enumerate(SPECIAL_TOKENS)), reserve=False), STYLES["chatml"]
)
TOKENIZERS = {"ascii-merges": TOKENIZER, "japanese-merges": JA_TOKENIZER}


def stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], TextStream]:
    """What the engine does: push until a stop string (or the ids run out), then flush."""
    s = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(s.push(token))
        if s.stopped:
            break
    pieces.append(s.flush())
    return pieces, s


def decoded(tokenizer, ids: list[int]) -> str:
    """The whole sequence's text less the replacement characters of an unfinished last character."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def cut_after_shi(tokenizer) -> list[int]:
    """The tokens of '今日はとてもしい' up to the first that leaves 'い' unfinished."""
    ids = tokenizer.encode("今日はとてもしい", add_special_tokens=False)
    k = next(k for k in range(len(ids)) if tokenizer.decode(ids[:k]) == "今日はとてもし\ufffd")
    return ids[:k]


def test_the_japanese_tokenizer_has_a_token_across_a_character_boundary():
    ids = cut_after_shi(JA_TOKENIZER)
    assert JA_TOKENIZER.decode(ids[:-1]) == "今日はとても"  # the last token ends 'し' and begins 'い'


@pytest.mark.parametrize("name", TOKENIZERS)
def test_flush_emits_the_text_before_an_unfinished_character(name):
    tokenizer = TOKENIZERS[name]
    pieces, s = stream(tokenizer, cut_after_shi(tokenizer), [])
    assert "".join(pieces) == "今日はとてもし" and not s.stopped


@pytest.mark.parametrize("name", TOKENIZERS)
def test_flush_emits_a_held_back_stop_prefix_before_an_unfinished_character(name):
    tokenizer = TOKENIZERS[name]
    pieces, s = stream(tokenizer, cut_after_shi(tokenizer), ["もしも"])
    assert "".join(pieces) == "今日はとてもし" and not s.stopped


def test_a_stop_string_ending_in_a_token_with_an_unfinished_character_stops_at_that_token():
    ids = cut_after_shi(JA_TOKENIZER)  # its last token completes 'もし' and leaves 'い' unfinished
    pieces, s = stream(JA_TOKENIZER, ids, ["もし"])
    assert s.stopped and len(s.ids) == len(ids)
    assert "".join(pieces) == "今日はとて"
    assert not any("も" in p for p in pieces)


def random_ids(rng: random.Random, tokenizer) -> list[int]:
    return [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_pushes_and_flush_give_the_decoded_sequence(name):
    tokenizer, rng = TOKENIZERS[name], random.Random(1234)
    for _ in range(2000):
        ids = random_ids(rng, tokenizer)
        pieces, s = stream(tokenizer, ids, [])
        assert "".join(pieces) == decoded(tokenizer, ids), ids
        assert not s.stopped


@pytest.mark.parametrize("name", TOKENIZERS)
def test_pushes_and_flush_give_the_decoded_sequence_cut_at_a_stop_string(name):
    tokenizer, rng = TOKENIZERS[name], random.Random(4321)
    for _ in range(2000):
        ids = random_ids(rng, tokenizer)
        text = decoded(tokenizer, ids)
        settled = text.replace("\ufffd", "")
        if rng.random() < 0.2 or not settled:
            stop = "\x00never"
        else:  # a piece of the text, so the stop string is hit somewhere
            start = rng.randrange(len(settled))
            stop = settled[start : start + rng.randint(1, 4)]
        pieces, s = stream(tokenizer, ids, [stop])
        at = text.find(stop)
        assert "".join(pieces) == (text if at < 0 else text[:at]), (ids, stop)
        assert s.stopped == (at >= 0)
