"""Tool calls parsed from recorded model outputs of each format, whole and streamed token by token:
content before the call, the calls in OpenAI's shape, finish_reason tool_calls."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")

from tiermoe.engine.request import GenerationStats, TokenEvent
from tiermoe.server.protocol import ChatCompletionRequest, ChatShape
from tiermoe.server.tool_calls import FORMATS, format_for, format_of, split_answer

FORMAT = {f.name: f for f in FORMATS}
WEATHER = {"location": "Paris", "unit": "celsius"}
# Outputs as the models write them (special tokens kept), from their chat templates and model cards.
RECORDED = {
    "hermes": (  # Qwen2.5 / Qwen3
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me check.\n",
    ),
    "mistral": (  # Mistral v3 tokenizer (Mixtral-8x22B-Instruct, Mistral-7B-Instruct-v0.3)
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"city": "Paris"}}]',
        "",
    ),
    "mistral-v11": (  # the newer tokenizer's name[ARGS]{...}
        '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"city": "Paris"}',
        "",
    ),
    "deepseek": (  # DeepSeek-V2.5 / V3
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"location": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
        'get_time\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "Sure.",
    ),
}
STATS = GenerationStats(prompt_tokens=10, completion_tokens=30)


def events_of(text: str, size: int = 3) -> list[TokenEvent]:
    """The text as a stream of small pieces, as the engine hands it out, ending with "stop"."""
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return [TokenEvent(0, i, p, "stop" if i == len(pieces) - 1 else None, STATS if i == len(pieces) - 1 else None)
            for i, p in enumerate(pieces)]  # fmt: skip


def fmt_of(case: str):
    return FORMAT[case.split("-")[0]]


@pytest.mark.parametrize("case", list(RECORDED))
def test_recorded_calls_parse_whole_and_streamed(case):
    text, content = RECORDED[case]
    whole = ChatShape("m", tools=fmt_of(case)).whole(events_of(text), [], None)["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == (content.strip() or None)
    calls = whole["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == WEATHER
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)

    shape = ChatShape("m", tools=fmt_of(case))
    chunks = (
        [c for e in events_of(text) if (c := shape.delta(e))]
        + shape.closing()
        + [shape.finish("stop", STATS)]
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == content  # no marker leaks into the content
    streamed = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed] == [0, 1]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_without_a_call_streams_whole_even_when_it_looks_like_a_marker_start():
    text = "A < B and [TOOL is not a call; <tool_ nor this."
    for fmt in FORMATS:
        shape = ChatShape("m", tools=fmt)
        chunks = [c for e in events_of(text, 1) if (c := shape.delta(e))] + shape.closing()
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text
        assert shape.finish("stop", STATS)["choices"][0]["finish_reason"] == "stop"
        assert split_answer(fmt, text) == (text, [])


def test_a_malformed_call_is_left_as_the_text_the_model_wrote():
    text = 'Here: <tool_call>\n{"name": "get_weather", "arguments": {"location": \n</tool_call>'
    whole = ChatShape("m", tools=FORMAT["hermes"]).whole(events_of(text), [], None)["choices"][0]
    assert whole["message"]["content"] == text and "tool_calls" not in whole["message"]
    assert whole["finish_reason"] == "stop"


def test_the_format_comes_from_the_chat_template_and_a_model_without_one_refuses_tools():
    assert (
        format_of("{% if tools %}...<tool_call>\\n{{ tool_call | tojson }}</tool_call>{% endif %}").name
        == "hermes"
    )
    assert format_of("{{ '[TOOL_CALLS]' + tool_calls | tojson }}").name == "mistral"
    assert format_of("<|im_start|>{{ m['role'] }}") is None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(Exception, match="no tool-call format") as info:
        format_for(tools, "auto", "<|im_start|>{{ m['role'] }}")
    assert info.value.param == "tools"
    assert (
        format_for(tools, "none", "<|im_start|>") is None and format_for([], "auto", "<|im_start|>") is None
    )


def test_history_with_calls_and_tool_results_reaches_the_template():
    req = ChatCompletionRequest(
        model="m",
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ],
    )  # fmt: skip
    history = req.template_messages()
    assert history[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": WEATHER}
    assert history[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    assert req.template_kwargs()["tools"][0]["function"]["name"] == "get_weather"
    assert (
        ChatCompletionRequest(
            model="m", messages=history[:1], tools=req.tools, tool_choice="none"
        ).template_kwargs()
        is None
    )
