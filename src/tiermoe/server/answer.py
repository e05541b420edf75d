"""A chat answer's text split as the API returns it, reasoning_content, content and tool_calls, while it
streams or whole: the reasoning parse first (reasoning.py), then tool calls looked for in the content it
leaves (tool_calls.py), so a reasoning model's calls after its thinking are found as a plain model's."""

from __future__ import annotations

from .reasoning import Reasoning, ReasoningStream
from .tool_calls import ToolCall, ToolFormat, ToolStream


class AnswerStream:
    """tools: the tool-call format to find (None: none); reasoning: the model's reasoning format (None:
    all content)."""

    def __init__(self, tools: ToolFormat | None = None, reasoning: Reasoning | None = None):
        self.reasoning = reasoning
        self.tool_stream = ToolStream(tools) if tools else None
        self.thinking: ReasoningStream | None = None  # the reasoning parse, once the prompt is known

    def begin(self, prompt_ids: list[int]) -> None:
        # The reasoning parse starts where the prompt left the answer (inside an open <think>?).
        self.thinking = self.reasoning.stream(prompt_ids) if self.reasoning else None

    def push(self, piece: str) -> tuple[str, str]:
        """Add model text; return the (reasoning, content) that can go out now: content is held back once
        a tool call may start."""
        reasoning, content = self.thinking.push(piece) if self.thinking else ("", piece)
        return reasoning, self.tool_stream.push(content) if self.tool_stream else content

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """At the end of the answer: the reasoning and content held back, and the tool calls."""
        reasoning, content = self.thinking.finish() if self.thinking else ("", "")
        if not self.tool_stream:
            return reasoning, content, []
        content = self.tool_stream.push(content)
        held, calls = self.tool_stream.finish()
        return reasoning, content + held, calls
