"""The Python API end to end on a tiny model: streaming, stop strings, chat template, seeds."""

import pytest

from tiermoe import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("qwen3_moe")[0], device="cpu")


def test_stream_yields_the_same_tokens_as_generate_and_ends_with_stats(llm):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    events = list(llm.stream("Hello there", params))
    out = llm.generate("Hello there", params)[0]
    assert [e.token_id for e in events] == out.token_ids
    assert "".join(e.text for e in events) == out.text
    assert events[-1].finish_reason == "length" and events[-1].stats.completion_tokens == 10
    assert all(e.stats is None for e in events[:-1])


def test_closing_the_stream_stops_generation(llm):
    stream = llm.stream("Hello", SamplingParams(max_tokens=200, ignore_eos=True))
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert len(first) == 3
    assert len(llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


def test_stop_string_ends_with_stop_and_cuts_the_text(llm):
    free = llm.generate("The quick", SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert stop and stop.strip()
    out = llm.generate("The quick", SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]


def test_seeded_sampling_reproduces(llm):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    assert llm.generate("Hi", params)[0].token_ids == llm.generate("Hi", params)[0].token_ids


def test_chat_applies_the_template_and_the_thinking_switch(llm):
    messages = [{"role": "user", "content": "Hi"}]
    on = llm.apply_chat_template(messages)
    off = llm.apply_chat_template(messages, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n") and off.endswith("<think>\n\n</think>\n\n")
    out = llm.chat(messages, SamplingParams(max_tokens=5, ignore_eos=True))
    assert out.prompt == on and len(out.token_ids) == 5
    assert out.prompt_token_ids == llm.encode(on, add_special_tokens=False)


def test_a_text_far_beyond_the_context_is_refused_after_tokenising_a_little_of_it(llm, monkeypatch):
    from tiermoe.errors import InvalidRequestError

    text = "The quick brown fox jumps over the lazy dog. " * 100_000  # 4.5 MB
    seen = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda t, **kw: seen.append(len(t)) or encode(t, **kw))
    with pytest.raises(InvalidRequestError, match="longer than the model's context") as info:
        llm.encode(text)
    assert info.value.param == "prompt" and sum(seen) < len(text) / 100
    # Texts that fit (and those near the limit) are tokenised whole, as before.
    fits = "The quick brown fox. " * 20
    assert llm.encode(fits) == encode(fits)
