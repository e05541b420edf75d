"""The OpenAI request models: what real clients send is accepted, mapped to SamplingParams, or refused
with the offending parameter named; the response shapes are what the openai client parses."""

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
from pydantic import ValidationError

from tiermoe.engine.request import GenerationStats, TokenEvent
from tiermoe.errors import InvalidRequestError
from tiermoe.server.protocol import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
)

USER = [{"role": "user", "content": "hi"}]


def test_fields_that_change_nothing_are_ignored_and_their_off_values_accepted():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "user": "u1", "metadata": {"a": "b"}, "frequency_penalty": 0,
         "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "auto", "n": 1, "logit_bias": {},
         "response_format": {"type": "text"}}
    )  # fmt: skip
    assert req.template_messages() == USER
    assert (
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 1, "echo": False}).prompt
        == "x"
    )


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (ChatCompletionRequest, "tool_choice", "required"),
        (ChatCompletionRequest, "response_format", {"type": "json_schema"}),
        (ChatCompletionRequest, "logit_bias", {"7": 1.0}),
        (CompletionRequest, "best_of", 3),
        (CompletionRequest, "suffix", "}"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(model, field, value):
    body = (
        {"model": "m", "messages": USER} if model is ChatCompletionRequest else {"model": "m", "prompt": "x"}
    )
    with pytest.raises(ValidationError) as info:
        model.model_validate({**body, field: value})
    assert info.value.errors()[0]["loc"] == (field,) and "not supported" in str(info.value)


def test_max_completion_tokens_wins_over_max_tokens_and_default_applies():
    assert (
        ChatCompletionRequest(
            model="m", messages=USER, max_tokens=5, max_completion_tokens=7
        ).requested_max_tokens()
        == 7
    )
    assert ChatCompletionRequest(model="m", messages=USER, max_tokens=5).requested_max_tokens() == 5
    assert (
        ChatCompletionRequest(model="m", messages=USER).requested_max_tokens() is None
    )  # to the end of the context


def test_sampling_params_mapping():
    req = ChatCompletionRequest(
        model="m",
        messages=USER,
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop="###",
        seed=3,
        top_k=20,
        ignore_eos=True,
    )
    p = req.sampling_params({})
    unset = ChatCompletionRequest(model="m", messages=USER).sampling_params({"top_p": 0.8})
    # unset: to the end of the context, and the checkpoint's defaults, both resolved in the engine
    assert (unset.max_tokens, unset.top_p, unset.top_k, unset.repetition_penalty) == (None, None, None, None)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.top_k, p.ignore_eos) == (
        9, 0.5, 0.9, ["###"], 3, 20, True
    )  # fmt: skip
    # OpenAI samples at temperature 1 when a client sends none; so do we, unless the checkpoint names one.
    assert unset.temperature == 1.0
    assert (
        ChatCompletionRequest(model="m", messages=USER).sampling_params({"temperature": 0.6}).temperature
        == 0.6
    )


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", -0.5), ("top_p", 0.0), ("max_tokens", 0), ("stop", [""])]
)
def test_out_of_range_values_name_the_parameter(field, value):
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": USER, field: value}).sampling_params(
            {}
        )
    assert info.value.param == field


def test_message_roles_and_content_parts():
    req = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ],
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ("model",)),
        ({"model": "m"}, ("messages",)),
        ({"messages": "hi"}, ("model",)),
        ({"messages": []}, ("messages",)),
        ({"messages": [{"role": "wizard", "content": "x"}]}, ("messages", 0, "role")),
        ({"messages": USER, "max_tokens": "ten"}, ("max_tokens",)),
        ({"messages": USER, "stream": {"a": 1}}, ("stream",)),
        ({"messages": USER, "n": 2}, ("n",)),
    ],
)
def test_malformed_requests_fail_validation_at_the_field(body, loc):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", **body} if body and loc != ("model",) else body)
    assert info.value.errors()[0]["loc"] == loc


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="abc").prompt == "abc"
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert CompletionRequest(model="m", prompt=["abc"]).prompt == "abc"  # a batch of one
    assert CompletionRequest(model="m", prompt=[[4, 5]]).prompt == [4, 5]
    with pytest.raises(ValidationError, match="one prompt per request"):
        CompletionRequest(model="m", prompt=["a", "b"])


def test_include_usage():
    assert ChatCompletionRequest(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    ).include_usage
    assert not ChatCompletionRequest(model="m", messages=USER, stream=True).include_usage


def test_response_shapes():
    stats = GenerationStats(prompt_tokens=4, completion_tokens=3, ttft_s=0.1, prefill_s=0.1, decode_s=0.5)
    chat = ChatShape("m")
    events = [TokenEvent(0, 7, "x"), TokenEvent(0, 8, "", "stop", stats)]
    chunks = [*chat.opening([], None), chat.delta(events[0]), chat.finish("stop", stats), chat.usage(stats)]
    assert chat.delta(events[1]) is None  # no text, no log-probability: no chunk
    assert {c["id"] for c in chunks} == {chat.id} and chat.id.startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[2]["choices"][0]["finish_reason"] == "stop" and chunks[2]["stats"]["decode_tok_s"] == 4.0
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 7
    whole = CompletionShape("m").whole(
        [TokenEvent(0, 7, "hel"), TokenEvent(0, 8, "lo", "length", stats)], [1], None
    )
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "hello"
    assert whole["choices"][0]["logprobs"] is None
    assert whole["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert whole["stats"]["prefill_tok_s"] == 40.0


def test_logprob_shapes():
    stats = GenerationStats(prompt_tokens=2, completion_tokens=2)
    text = {1: "A", 2: "b", 7: "x", 8: "é", 9: "z"}.__getitem__
    events = [
        TokenEvent(0, 7, "x", None, None, -0.5, [(7, -0.5), (9, -1.5)]),
        TokenEvent(0, 8, "é", "length", stats, -2.0, [(9, -1.0), (8, -2.0)]),
    ]
    content = ChatShape("m", text).whole(events, [1, 2], None)["choices"][0]["logprobs"]["content"]
    assert content[1] == {"token": "é", "logprob": -2.0, "bytes": [195, 169], "top_logprobs": [
        {"token": "z", "logprob": -1.0, "bytes": [122]}, {"token": "é", "logprob": -2.0, "bytes": [195, 169]}]}  # fmt: skip
    echo = CompletionShape("m", text, echo=True, decode=lambda ids: "".join(map(text, ids)))
    whole = echo.whole(events, [1, 2], [(-3.0, [(2, -3.0), (9, -4.0)])])["choices"][0]
    assert whole["text"] == "Abxé"
    assert whole["logprobs"] == {
        "tokens": ["A", "b", "x", "é"],
        "token_logprobs": [None, -3.0, -0.5, -2.0],
        "top_logprobs": [None, {"b": -3.0, "z": -4.0}, {"x": -0.5, "z": -1.5}, {"z": -1.0, "é": -2.0}],
        "text_offset": [0, 1, 2, 3],
    }


def test_top_logprobs_imply_logprobs_and_have_a_range():
    assert ChatCompletionRequest(model="m", messages=USER, top_logprobs=3).sampling_params({}).logprobs == 3
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=USER, top_logprobs=21)
    assert info.value.errors()[0]["loc"] == ("top_logprobs",)
    req = ChatCompletionRequest(model="m", messages=USER, logprobs=True, top_logprobs=3)
    assert req.sampling_params({}).logprobs == 3
    assert ChatCompletionRequest(model="m", messages=USER, logprobs=True).sampling_params({}).logprobs == 0
    assert ChatCompletionRequest(model="m", messages=USER).sampling_params({}).logprobs is None
    with pytest.raises(ValidationError) as info:
        CompletionRequest(model="m", prompt="x", logprobs=21)
    assert info.value.errors()[0]["loc"] == ("logprobs",)
