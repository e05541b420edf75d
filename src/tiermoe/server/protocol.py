"""OpenAI-compatible request, response and error models.

Requests ignore fields that change nothing here (`user`, `metadata`, `store`, ...) because real clients
send many of them; a field that would change the answer and is not supported (images, `n` > 1,
`best_of`, a `response_format` other than text, ...) is a 400 naming it, never a silent 200. The fields we
read are typed, so a wrong type is a 400, not a crash. Value ranges (temperature >= 0, ...) are checked
once, by SamplingParams, which names the offending parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.request import GenerationStats, SamplingParams


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


def unsupported(field: str, why: str, allowed: tuple = (None,)):
    """A validator refusing every value of `field` but `allowed` (what means "off"): the 400 names it."""

    def check(value):
        if not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise ValueError(why)
        return value

    return field_validator(field)(classmethod(lambda cls, value: check(value)))


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
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None

    _n = unsupported("n", "only n=1 is supported; send n separate requests with different seeds", (1,))
    _logit_bias = unsupported("logit_bias", "logit_bias is not supported", (None, {}))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

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
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None
    echo: bool = False

    _best_of = unsupported("best_of", "best_of is not supported (it needs n > 1)", (None, 1))
    _suffix = unsupported("suffix", "suffix (fill in the middle) is not supported", (None, ""))
    _logprobs = unsupported("logprobs", "logprobs are not supported yet")
    _echo = unsupported("echo", "echo is not supported yet", (False,))

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
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"content parts of type {kind!r} are not supported: this server takes text only")
        return kind


class ChatMessage(_Lenient):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def to_template(self) -> dict[str, str]:
        """The {"role", "content"} dict chat templates expect; text parts are joined in order."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            return {"role": role, "content": "".join(part.text or "" for part in self.content)}
        return {"role": role, "content": self.content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    # Thinking switch: inside chat_template_kwargs as in vLLM, or top-level (which wins when both are set).
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    _logprobs = unsupported("logprobs", "logprobs are not supported yet", (False,))
    _top_logprobs = unsupported("top_logprobs", "top_logprobs are not supported yet", (None, 0))
    _tools = unsupported("tools", "tools are not supported yet", (None, []))
    _tool_choice = unsupported("tool_choice", "tool_choice is not supported yet", (None, "none", "auto"))

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(
                f"response_format {value.get('type')!r} is not supported (structured output is not in yet)"
            )
        return value

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; newer clients send only it.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template() for m in self.messages]


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
    as OpenAI's are; our per-request stats ride on the final chunk and the whole response."""

    endpoint: str
    id_prefix: str
    chunk_object: str

    def __init__(self, model: str):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _header(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict) -> dict:
        return {**self._header(self.chunk_object), "choices": [{"index": 0, "logprobs": None, **choice}]}

    def usage(self, stats: GenerationStats) -> dict:
        """The extra last chunk asked for by stream_options.include_usage: no choices, only usage."""
        return {**self._header(self.chunk_object), "choices": [], "usage": Usage.of(stats).model_dump()}

    def opening(self) -> list[dict]:
        return []


class ChatShape(_Shape):
    endpoint = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def delta(self, text: str) -> dict:
        return self._chunk({"delta": {"content": text}, "finish_reason": None})

    def finish(self, reason: str, stats: GenerationStats) -> dict:
        return {**self._chunk({"delta": {}, "finish_reason": reason}), "stats": stats.to_dict()}

    def whole(self, text: str, reason: str, stats: GenerationStats) -> dict:
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            **self._header("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
            "usage": Usage.of(stats).model_dump(),
            "stats": stats.to_dict(),
        }


class CompletionShape(_Shape):
    endpoint = "/v1/completions"
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def delta(self, text: str) -> dict:
        return self._chunk({"text": text, "finish_reason": None})

    def finish(self, reason: str, stats: GenerationStats) -> dict:
        return {**self._chunk({"text": "", "finish_reason": reason}), "stats": stats.to_dict()}

    def whole(self, text: str, reason: str, stats: GenerationStats) -> dict:
        return {
            **self._header("text_completion"),
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            "usage": Usage.of(stats).model_dump(),
            "stats": stats.to_dict(),
        }
