"""Tool calls in model output: each family's format, found in the chat template, parsed into OpenAI's
`tool_calls`, whole or while the text streams.

A format is the marker its calls start with and a parser of the text from there to the end of the
answer. Text before the first marker is the message's content. While streaming, text that could be the
start of a marker is held back until it cannot (as stop strings are), and from the marker on nothing is
streamed as content: the calls go out as tool_call deltas once the answer ends.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip
        return call if index is None else {"index": index, **call}


def _call(obj) -> ToolCall:
    """{"name": ..., "arguments": {...} or "..."} -> ToolCall; anything else is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"not a tool call: {obj!r}")
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _hermes(text: str) -> list[ToolCall]:
    # Qwen2.5 / Qwen3 (Hermes style): <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, repeated
    bodies = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S)
    return [_call(json.loads(body)) for body in bodies if body]


def _mistral(text: str) -> list[ToolCall]:
    # Mistral / Mixtral v3: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
    # and the v11+ tokenizer's [TOOL_CALLS]name[ARGS]{...}, repeated
    body = text.split("[TOOL_CALLS]", 1)[1].strip()
    if body.startswith("["):
        return [_call(obj) for obj in json.loads(body)]
    parts = re.findall(r"\[TOOL_CALLS\]\s*([^\[\s]+)\[ARGS\](.*?)(?=\[TOOL_CALLS\]|$)", text, re.S)
    return [ToolCall(name, json.dumps(json.loads(args), ensure_ascii=False)) for name, args in parts]


def _deepseek(text: str) -> list[ToolCall]:
    # DeepSeek-V2/V3: <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>
    calls = re.findall(
        r"<｜tool▁call▁begin｜>\s*\w*\s*<｜tool▁sep｜>\s*(.+?)\s*\n```(?:json)?\s*(.*?)\s*```\s*<｜tool▁call▁end｜>",
        text,
        re.S,
    )
    return [ToolCall(name, json.dumps(json.loads(args), ensure_ascii=False)) for name, args in calls]


@dataclass(frozen=True)
class ToolFormat:
    name: str
    marker: str  # where the calls start, in the model's text (special tokens kept)
    parse: Callable[[str], list[ToolCall]]


# The registry: a chat template that writes the marker is a model that emits it.
FORMATS = [
    ToolFormat("hermes", "<tool_call>", _hermes),
    ToolFormat("mistral", "[TOOL_CALLS]", _mistral),
    ToolFormat("deepseek", "<｜tool▁calls▁begin｜>", _deepseek),
]


def format_of(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, if any tiermoe parses."""
    return next((f for f in FORMATS if chat_template and f.marker in chat_template), None)


def split_answer(fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
    """(content before the calls, the calls). A call the model did not finish or wrote malformed leaves
    the whole text as content, as it was written: the client sees what the model said."""
    at = text.find(fmt.marker)
    if at < 0:
        return text, []
    try:
        calls = fmt.parse(text[at:])
    except (ValueError, IndexError):
        return text, []
    return (text[:at], calls) if calls else (text, [])


class ToolStream:
    """Streams content until a tool call starts, then holds the rest until the answer ends."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.sent = 0  # characters of content streamed
        self.in_call = False

    def push(self, piece: str) -> str:
        """Add model text; return the content that can be streamed now."""
        self.text += piece
        if self.in_call:
            return ""
        at = self.text.find(self.fmt.marker, self.sent)  # what was streamed holds no marker
        if at >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent : at], at
            return out
        # Hold back a tail that could be the start of the marker.
        keep = next(
            (n for n in range(len(self.fmt.marker) - 1, 0, -1) if self.text.endswith(self.fmt.marker[:n])), 0
        )
        end = max(self.sent, len(self.text) - keep)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: the content still held back, and the calls."""
        content, calls = split_answer(self.fmt, self.text)
        return content[self.sent :], calls


def format_for(tools: list | None, tool_choice, chat_template: str | None) -> ToolFormat | None:
    """The format to parse for this request (None: no tools in play); a model whose template has no
    format tiermoe parses cannot take tools (InvalidRequestError)."""
    if not tools or tool_choice == "none":
        return None
    fmt = format_of(chat_template)
    if fmt is None:
        raise InvalidRequestError(
            "this model's chat template has no tool-call format tiermoe parses (Qwen's <tool_call>, "
            "Mistral's [TOOL_CALLS], DeepSeek's)",
            "tools",
        )
    return fmt
