"""Reasoning in model output, split from the answer as vLLM and llama.cpp do: OpenAI's chat API gains
`message.reasoning_content` (streamed as `delta.reasoning_content`) beside `content`. Two families:

- harmony (gpt-oss): the answer is a run of messages, `<|channel|>analysis<|message|>...<|end|>`
  `<|start|>assistant<|channel|>final<|message|>...`, whose markers are special tokens, so the text must
  keep them. The analysis channel is reasoning; final and commentary (the preambles) are content. A
  message to a recipient (`to=functions.get_weather`: a tool call) is not parsed: it goes to content as
  the model wrote it, header and all.
- think tags (Qwen3, DeepSeek-R1): `<think>reasoning</think>answer`, see ThinkStream.

The format is found in the chat template, as tool-call formats are. Each answer gets a stream that takes
the text in pieces and hands out (reasoning, content) as soon as they cannot change: text that could
still begin a marker is held back, as stop strings are, so any split of the text gives what parsing it
whole (one push and the finish) gives.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROMPT_TAIL = 8  # prompt tokens decoded to see where the template left the answer (an open <think>)


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of text that could still grow into one of the markers."""
    return max(
        (n for m in markers for n in range(min(len(m) - 1, len(text)), 0, -1) if text.endswith(m[:n])),
        default=0,
    )


class ReasoningStream(ABC):
    """One answer's parse: all the text held is parsed at each push, the rest at the finish."""

    def __init__(self):
        self.text = ""  # pushed, not yet handed out

    def push(self, piece: str) -> tuple[str, str]:
        """Add model text; return the (reasoning, content) that can be handed out now."""
        self.text += piece
        return self._parse(end=False)

    def finish(self) -> tuple[str, str]:
        """At the end of the answer: the (reasoning, content) still held back."""
        return self._parse(end=True)

    @abstractmethod
    def _parse(self, end: bool) -> tuple[str, str]:
        """(reasoning, content) of the text held that can go out; end: all of it."""


THINK, END_THINK = "<think>", "</think>"
_START, _REASONING, _CONTENT = "start", "reasoning", "content"


class ThinkStream(ReasoningStream):
    """`<think>reasoning</think>content`. Reasoning starts the answer when the prompt ends inside an open
    <think> (Qwen3-Thinking-2507's and DeepSeek-R1's templates write it) or when the answer itself starts
    with <think> (Qwen3's first templates leave it to the model); otherwise the answer is content as
    written: the same templates teach <think> to models that never think (Qwen3-Instruct-2507), and with
    enable_thinking off the prompt closes it. The first </think> ends the reasoning and the rest is
    content, tags and all, as in vLLM. An answer that never writes </think> was cut short while thinking:
    all of it is reasoning, as vLLM's qwen3 parser has it with thinking on (but vLLM, told by a flag that
    the model reasons, also takes an answer without any tag for reasoning; we find the format in the
    template, and a template's <think> does not make every answer a thought). The whitespace around the
    reasoning and before the content that follows it is dropped (the newlines around the tags)."""

    def __init__(self, opened: bool):
        super().__init__()
        self.opened = opened
        self.state = _START
        self.trim = False  # drop the whitespace that opens the current part

    def _parse(self, end: bool) -> tuple[str, str]:
        reasoning = ""
        if self.state == _START:
            head = self.text.lstrip()
            if not end and len(head) < len(THINK) and THINK.startswith(head):  # blank, or <think> under way
                return "", ""
            if head.startswith(THINK) or self.opened:  # a repeated <think> after the prompt's is dropped too
                self.state, self.text, self.trim = _REASONING, head.removeprefix(THINK), True
            else:
                self.state = _CONTENT
        if self.state == _REASONING:
            self._trim()
            at = self.text.find(END_THINK)
            if at < 0 and end:
                reasoning, self.text = self.text.rstrip(), ""
                return reasoning, ""
            if at < 0:
                # Held: a tail that may begin </think>, and the whitespace before it (dropped if it does).
                cut = len(self.text[: len(self.text) - _held(self.text, (END_THINK,))].rstrip())
                reasoning, self.text = self.text[:cut], self.text[cut:]
                return reasoning, ""
            reasoning = self.text[:at].rstrip()
            self.state, self.text, self.trim = _CONTENT, self.text[at + len(END_THINK) :], True
        self._trim()
        content, self.text = self.text, ""
        return reasoning, content

    def _trim(self) -> None:
        if self.trim:
            self.text = self.text.lstrip()
            self.trim = not self.text


_MESSAGE, _NEXT = "<|message|>", "<|start|>"
_ENDS = ("<|end|>", "<|return|>", "<|call|>")  # <|return|> and <|call|> stop generation, unless ignored
_HEADS = ("<|", "to=")  # how a header starts: a marker, or a recipient before the channel
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=")
_RAW = "raw"


def _route(header: str) -> str:
    if _RECIPIENT.search(header):
        return _RAW
    channel = _CHANNEL.search(header)
    return _REASONING if channel and channel.group(1) == "analysis" else _CONTENT


class HarmonyStream(ReasoningStream):
    """gpt-oss's messages: each a header up to <|message|>, then a body up to <|end|> (or a stop token, or
    the next <|start|>). The prompt ends with `<|start|>assistant`, so the first header is the channel.
    Text where a header should be that cannot begin one is content as written (a model that does not
    speak harmony); a header the answer ends inside is dropped (markup, no message yet)."""

    def __init__(self):
        super().__init__()
        self.route: str | None = None  # where the current body goes; None: in a header

    def _parse(self, end: bool) -> tuple[str, str]:
        out = {_REASONING: "", _CONTENT: ""}
        while True:
            if self.route is None:
                head = self.text.lstrip()
                if head and not any(h.startswith(head[: len(h)]) for h in _HEADS):
                    self.route = _CONTENT  # no header: the text is the body
                    continue
                at = self.text.find(_MESSAGE)
                if at < 0:
                    if end:
                        self.text = ""
                    break
                header, self.text = self.text[:at], self.text[at + len(_MESSAGE) :]
                self.route = _route(header)
                if self.route == _RAW:
                    out[_CONTENT] += header + _MESSAGE
            stops = [(i, m) for m in (*_ENDS, _NEXT) if (i := self.text.find(m)) >= 0]
            if not stops:
                cut = len(self.text) if end else len(self.text) - _held(self.text, (*_ENDS, _NEXT))
                body, self.text = self.text[:cut], self.text[cut:]
                out[_CONTENT if self.route == _RAW else self.route] += body
                break
            at, marker = min(stops)
            after = at if marker == _NEXT else at + len(marker)  # <|start|> begins the next header
            body, self.text = self.text[:after], self.text[after:]
            if self.route == _RAW:
                out[_CONTENT] += body
            else:
                out[self.route] += body[:at]
            self.route = None
        return out[_REASONING], out[_CONTENT]


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    marker: str  # in the chat template: a model taught it writes this format
    markers: tuple[str, ...]  # what the parse reads, so what decoding must keep
    start: Callable[[str], ReasoningStream]  # a stream for the answer to a prompt ending in this text


# The registry, in the order template markers are looked for.
FORMATS = [
    ReasoningFormat(
        "harmony", "<|channel|>", ("<|channel|>", _MESSAGE, _NEXT, *_ENDS), lambda _: HarmonyStream()
    ),
    ReasoningFormat(
        "think", THINK, (THINK, END_THINK), lambda tail: ThinkStream(tail.rstrip().endswith(THINK))
    ),
]


def format_of(chat_template: str | None) -> ReasoningFormat | None:
    """The reasoning format a chat template teaches its model, if any tiermoe parses."""
    return next((f for f in FORMATS if chat_template and f.marker in chat_template), None)


@dataclass(frozen=True)
class Reasoning:
    """A model's reasoning format with its tokenizer: what each request needs of it."""

    format: ReasoningFormat
    tokenizer: Any

    def keeps_special_tokens(self) -> bool:
        """Whether decoding must keep special tokens for the markers to show: gpt-oss's are special,
        Qwen's <think> is not (the synthetic ChatML tokenizer's is)."""
        tok = self.tokenizer
        return any(
            m not in tok.decode(tok.encode(m, add_special_tokens=False), skip_special_tokens=True)
            for m in self.format.markers
        )

    def stream(self, prompt_ids: list[int]) -> ReasoningStream:
        tail = self.tokenizer.decode(prompt_ids[-PROMPT_TAIL:], skip_special_tokens=False)
        return self.format.start(tail)


def reasoning_of(tokenizer) -> Reasoning | None:
    """The reasoning parse of a model's answers (None: no tokenizer, or a template without a format)."""
    fmt = format_of(getattr(tokenizer, "chat_template", None))
    return Reasoning(fmt, tokenizer) if fmt else None
