"""OpenAI-compatible request, response and error models.

Requests ignore fields that change nothing here (`user`, `metadata`, `store`, ...) because real clients
send many of them; a field that would change the answer and is not supported (images, `n` > 1,
`best_of`, a `response_format` other than text, ...) is a 400 naming it, never a silent 200. The fields we
read are typed, so a wrong type is a 400, not a crash. Value ranges (temperature >= 0, ...) are checked
once, by SamplingParams, which names the offending parameter.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.request import MAX_TOP_LOGPROBS, GenerationStats, SamplingParams, TokenEvent
from .answer import AnswerStream
from .reasoning import Reasoning
from .tool_calls import ToolCall, ToolFormat


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


def only(*allowed, default=None):
    """A field whose values beyond `allowed` (those meaning "off") would change the answer and are not
    supported: the OpenAPI schema lists the allowed ones, and `refuse_others` checks them."""
    return Field(default, json_schema_extra={"enum": list(allowed)})


def refuse_others(field: str, why: str):
    """The validator of an `only` field: any other value is a 400 naming the field."""

    def check(cls, value):
        allowed = cls.model_fields[field].json_schema_extra["enum"]
        if not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise ValueError(why)
        return value

    return field_validator(field)(classmethod(check))


class _SamplingFields(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions, plus vLLM's common extensions
    (top_k, repetition_penalty, ignore_eos, stop_token_ids) that tools like lm-eval send."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = only(1, default=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = only(None, {})

    _n = refuse_others("n", "only n=1 is supported; send n separate requests with different seeds")
    _logit_bias = refuse_others("logit_bias", "logit_bias is not supported")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each token's and the k likeliest alternatives."""
        return None

    def sampling_params(self, model_defaults: dict) -> SamplingParams:
        """Our SamplingParams; raises InvalidRequestError (param named) for out-of-range values. Unset
        fields take the checkpoint's generation_config.json values (`model_defaults`) in the engine,
        except temperature: with neither the client nor the checkpoint naming one, OpenAI's default of
        1 applies, so such a client samples as it would there. No max_tokens: to the context end."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = (
            self.temperature if self.temperature is not None else model_defaults.get("temperature", 1.0)
        )
        return SamplingParams(
            max_tokens=self.requested_max_tokens(),
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=self.requested_logprobs(),
        )


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class CompletionRequest(_SamplingFields):
    # The schema says what is served: one prompt, text or token ids (a batch of one is that prompt).
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                _IDS,
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": _IDS, "minItems": 1, "maxItems": 1},
            ]
        }
    )
    best_of: int | None = only(None, 1)
    suffix: str | None = only(None, "")
    # the legacy API's: how many alternatives per token (0: the token's only)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt before the completion (with its tokens' log-probabilities)

    _best_of = refuse_others("best_of", "best_of is not supported (it needs n > 1)")
    _suffix = refuse_others("suffix", "suffix (fill in the middle) is not supported")

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt):
        # A list of prompts is a batch in OpenAI's API; a list of one is common and harmless.
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported; send one request per prompt")
            return prompt[0]
        return prompt


class ContentPart(_Lenient):
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"content parts of type {kind!r} are not supported: this server takes text only")
        return kind


class FunctionCall(_Lenient):
    name: str
    arguments: str  # JSON text


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The dict chat templates expect: text parts joined in order; an assistant's tool calls with their
        arguments as an object (the templates write them with tojson), a tool message's call id."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            out: dict[str, Any] = {"role": role, "content": "".join(part.text or "" for part in self.content)}
        else:
            out = {"role": role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    # Thinking switch: inside chat_template_kwargs as in vLLM, or top-level (which wins when both are set).
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra={"properties": {"type": {"enum": ["text"]}}}
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS
    )  # alternatives per token; implies logprobs
    tools: list[dict[str, Any]] | None = None  # passed to the chat template; calls parsed from the answer
    tool_choice: str | dict[str, Any] | None = only(None, "none", "auto")

    _tool_choice = refuse_others(
        "tool_choice",
        "tool_choice 'required' or a named function is not supported: it needs constrained decoding, which "
        "tiermoe does not have yet; use 'auto'",
    )

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(
                f"response_format {value.get('type')!r} is not supported (structured output is not in yet)"
            )
        return value

    def requested_logprobs(self) -> int | None:
        # OpenAI asks for logprobs: true beside top_logprobs; asking for alternatives is asking enough.
        return (self.top_logprobs or 0) if self.logprobs or self.top_logprobs else None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; newer clients send only it.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def template_kwargs(self) -> dict[str, Any] | None:
        """chat_template_kwargs, with the tools when they are in play (tool_choice "none" leaves them out)."""
        if not self.tools or self.tool_choice == "none":
            return self.chat_template_kwargs
        return {**(self.chat_template_kwargs or {}), "tools": self.tools}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, stats: GenerationStats) -> Usage:
        return cls(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            total_tokens=stats.prompt_tokens + stats.completion_tokens,
        )


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class _Shape:
    """The JSON of one response, streamed or whole. id, created and model are shared by every chunk,
    as OpenAI's are; our per-request stats ride on the final chunk and the whole response. token_text:
    the text of one token id, for log-probabilities (None when the request asked for none)."""

    endpoint: str
    id_prefix: str
    chunk_object: str

    def __init__(self, model: str, token_text: Callable[[int], str] | None = None):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text

    def _header(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict) -> dict:
        return {**self._header(self.chunk_object), "choices": [{"index": 0, "logprobs": None, **choice}]}

    def usage(self, stats: GenerationStats) -> dict:
        """The extra last chunk asked for by stream_options.include_usage: no choices, only usage."""
        return {**self._header(self.chunk_object), "choices": [], "usage": Usage.of(stats).model_dump()}

    def _scored(self, events: list[TokenEvent]) -> list[TokenEvent]:
        return [e for e in events if e.logprob is not None] if self.token_text else []


class ChatShape(_Shape):
    """tools: the tool-call format to find in the answer (None: plain text). reasoning: the model's
    reasoning format (None: all content)."""

    endpoint = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        model: str,
        token_text: Callable[[int], str] | None = None,
        tools: ToolFormat | None = None,
        reasoning: Reasoning | None = None,
    ):
        super().__init__(model, token_text)
        self.reasoning = reasoning
        self.answer = AnswerStream(tools, reasoning)
        self.calls: list[ToolCall] = []

    def opening(self, prompt_ids: list[int], prompt_scores: list | None) -> list[dict]:
        self.answer.begin(prompt_ids)
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def delta(self, event: TokenEvent) -> dict | None:
        """The chunk of one event; None when it carries neither text nor a log-probability."""
        scored = self._scored([event])
        reasoning, text = self.answer.push(event.text)
        if not reasoning and not text and not scored:
            return None
        choice = {"delta": _delta(reasoning, text), "finish_reason": None}
        return self._chunk({**choice, **({"logprobs": self._logprobs(scored)} if scored else {})})

    def closing(self) -> list[dict]:
        """Once the answer ended: the text held back, then the tool calls, one delta each."""
        reasoning, rest, self.calls = self.answer.finish()
        held = (
            [self._chunk({"delta": _delta(reasoning, rest), "finish_reason": None})]
            if reasoning or rest
            else []
        )
        return held + [
            self._chunk({"delta": {"tool_calls": [call.to_openai(i)]}, "finish_reason": None})
            for i, call in enumerate(self.calls)
        ]

    def finish(self, reason: str, stats: GenerationStats) -> dict:
        reason = "tool_calls" if self.calls else reason
        return {**self._chunk({"delta": {}, "finish_reason": reason}), "stats": stats.to_dict()}

    def whole(self, events: list[TokenEvent], prompt_ids: list[int], prompt_scores: list | None) -> dict:
        last = events[-1]
        self.answer.begin(prompt_ids)
        (r1, c1), (r2, c2, calls) = self.answer.push("".join(e.text for e in events)), self.answer.finish()
        text = c1 + c2
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        if self.reasoning:  # null when the model did not think
            message["reasoning_content"] = (r1 + r2) or None
        if calls:  # as OpenAI: no content beside the calls unless the model wrote some
            message.update(content=text.strip() or None, tool_calls=[c.to_openai() for c in calls])
        logprobs = self._logprobs(self._scored(events)) if self.token_text else None
        return {
            **self._header("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": "tool_calls" if calls else last.finish_reason,
                }
            ],
            "usage": Usage.of(last.stats).model_dump(),
            "stats": last.stats.to_dict(),
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, events: list[TokenEvent]) -> dict:
        content = [
            {
                **self._entry(e.token_id, e.logprob),
                "top_logprobs": [self._entry(i, lp) for i, lp in e.top_logprobs],
            }
            for e in events
        ]
        return {"content": content, "refusal": None}


def _delta(reasoning: str, content: str) -> dict:
    """A chat delta: reasoning_content only when there is some, as vLLM sends it; content otherwise."""
    return ({"reasoning_content": reasoning} if reasoning else {}) | (
        {"content": content} if content or not reasoning else {}
    )


class CompletionShape(_Shape):
    """prompt_ids, prompt_scores: with echo, the prompt's tokens and their log-probabilities (all but the
    first, which has no history), known once the engine has tokenised the prompt."""

    endpoint = "/v1/completions"
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(
        self,
        model: str,
        token_text: Callable[[int], str] | None = None,
        echo: bool = False,
        decode: Callable[[list[int]], str] | None = None,
    ):
        super().__init__(model, token_text)
        self.echo, self.decode = echo, decode  # decode: the prompt's text, for echo
        self.offset = 0  # characters of text sent before the next token, for text_offset

    def opening(self, prompt_ids: list[int], prompt_scores: list | None) -> list[dict]:
        if not self.echo:
            return []
        return [self._chunk({"text": self._prompt_text(prompt_ids), "finish_reason": None,
                             "logprobs": self._prompt_logprobs(prompt_ids, prompt_scores)})]  # fmt: skip

    def delta(self, event: TokenEvent) -> dict | None:
        scored = self._scored([event])
        if not event.text and not scored:
            return None
        return self._chunk({"text": event.text, "finish_reason": None, "logprobs": self._logprobs(scored)})

    def closing(self) -> list[dict]:
        return []

    def finish(self, reason: str, stats: GenerationStats) -> dict:
        return {**self._chunk({"text": "", "finish_reason": reason}), "stats": stats.to_dict()}

    def whole(self, events: list[TokenEvent], prompt_ids: list[int], prompt_scores: list | None) -> dict:
        last = events[-1]
        prefix = self._prompt_text(prompt_ids) if self.echo else ""
        logprobs = None
        if self.token_text:
            head = self._prompt_logprobs(prompt_ids, prompt_scores) if self.echo else None
            tail = self._logprobs(self._scored(events))
            logprobs = {k: (head[k] if head else []) + tail[k] for k in tail}
        return {
            **self._header("text_completion"),
            "choices": [
                {
                    "index": 0,
                    "text": prefix + "".join(e.text for e in events),
                    "finish_reason": last.finish_reason,
                    "logprobs": logprobs,
                }
            ],
            "usage": Usage.of(last.stats).model_dump(),
            "stats": last.stats.to_dict(),
        }

    def _prompt_text(self, prompt_ids: list[int]) -> str:
        return self.decode(prompt_ids)

    def _prompt_logprobs(self, prompt_ids: list[int], prompt_scores: list | None) -> dict | None:
        if not self.token_text:
            return None
        # The first prompt token has no history: null, as OpenAI's echo gives it.
        scores = [(None, None), *prompt_scores] if prompt_ids else []
        return self._table(prompt_ids, scores)

    def _logprobs(self, events: list[TokenEvent]) -> dict | None:
        if not self.token_text:
            return None
        return self._table([e.token_id for e in events], [(e.logprob, e.top_logprobs) for e in events])

    def _table(self, token_ids: list[int], scores: list) -> dict:
        """The legacy logprobs object: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
        table = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, (logprob, top) in zip(token_ids, scores, strict=True):
            text = self.token_text(token_id)
            table["tokens"].append(text)
            table["token_logprobs"].append(logprob)
            table["top_logprobs"].append(None if top is None else {self.token_text(i): lp for i, lp in top})
            table["text_offset"].append(self.offset)
            self.offset += len(text)
        return table
