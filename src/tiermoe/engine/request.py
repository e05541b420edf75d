"""What a caller asks for (SamplingParams) and what it gets back (RequestOutput, GenerationStats, TokenEvent)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20  # as OpenAI's API

# What a field left None becomes when the checkpoint's generation_config.json does not say either.
FALLBACKS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy. A sampling field left None takes
    the checkpoint's generation_config.json value, else FALLBACKS; max_tokens None runs to the end of the
    context (or of the KV cache reserve, whichever comes first)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0: no top-k cut
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = ()
    stop_token_ids: list[int] | tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest
    skip_special_tokens: bool = True  # False keeps markers such as Mistral's [TOOL_CALLS] in the text

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        given = lambda v: v is not None  # noqa: E731
        finite = lambda v: v is None or math.isfinite(v)  # noqa: E731
        checks = [
            (
                not given(self.max_tokens) or self.max_tokens >= 1,
                "max_tokens",
                "max_tokens must be at least 1",
            ),
            (
                finite(self.temperature) and (not given(self.temperature) or self.temperature >= 0),
                "temperature",
                "temperature must be a finite number >= 0",
            ),
            (not given(self.top_k) or self.top_k >= 0, "top_k", "top_k must be >= 0 (0 disables it)"),
            (
                finite(self.top_p) and (not given(self.top_p) or 0 < self.top_p <= 1),
                "top_p",
                "top_p must be in (0, 1]",
            ),
            (
                finite(self.repetition_penalty)
                and (not given(self.repetition_penalty) or self.repetition_penalty > 0),
                "repetition_penalty",
                "repetition_penalty must be a finite number > 0",
            ),
            # torch's generators take any integer of 64 bits, signed or not
            (not given(self.seed) or -(2**63) <= self.seed < 2**64, "seed", "seed must fit in 64 bits"),
            (
                all(0 <= t < 2**63 for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be token ids >= 0",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty"),
            (
                not given(self.logprobs) or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"the number of top log-probabilities must be 0 to {MAX_TOP_LOGPROBS}",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    def resolved(self, defaults: dict, max_tokens: int) -> SamplingParams:
        """Every field set: unset sampling fields from `defaults` (generation_config.json) or FALLBACKS,
        max_tokens from the caller's resolution of the context end when unset."""
        fields = {
            k: getattr(self, k) if getattr(self, k) is not None else defaults.get(k, fallback)
            for k, fallback in FALLBACKS.items()
        }
        return replace(self, **fields, max_tokens=self.max_tokens or max_tokens)


@dataclass
class GenerationStats:
    """Timing and memory of one generate call; decode_tok_s counts tokens of the whole batch."""

    sequences: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_gpu_gib: float = 0.0
    peak_host_gib: float = 0.0
    experts: dict = field(default_factory=dict)  # expert-store statistics of the whole call
    experts_decode: dict = field(default_factory=dict)  # the same, counted over decode steps only

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # Each sequence's first token comes out of prefill; the rest are decode steps.
        steps = max(self.completion_tokens - self.sequences, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 6),
            "prefill_tok_s": round(self.prefill_tok_s, 3),
            "decode_tok_s": round(self.decode_tok_s, 3),
            "peak_gpu_gib": round(self.peak_gpu_gib, 4),
            "peak_host_gib": round(self.peak_host_gib, 4),
            "experts": self.experts,
            "experts_decode": self.experts_decode,
        }

    def line(self) -> str:
        text = (
            f"prompt {self.prompt_tokens} tok | completion {self.completion_tokens} tok | "
            f"TTFT {self.ttft_s * 1000:.1f} ms | prefill {self.prefill_tok_s:.1f} tok/s | "
            f"decode {self.decode_tok_s:.2f} tok/s | peak GPU {self.peak_gpu_gib:.2f} GiB | "
            f"peak host {self.peak_host_gib:.2f} GiB"
        )
        e = self.experts
        if e.get("gpu_hit_rate") is not None:
            pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            text += (
                f" | experts: GPU hits {pct(e['gpu_hit_rate'])}, prefetch precision "
                f"{pct(e['prefetch_precision'])} recall {pct(e['prefetch_recall'])}, "
                f"H2D {e['bytes_h2d'] / 1e9:.2f} GB, disk {e['bytes_disk'] / 1e9:.2f} GB"
            )
            if e.get("bytes_in_place"):
                text += f", read in place {e['bytes_in_place'] / 1e9:.2f} GB"
            if e.get("cpu_computed"):
                text += f", {e['cpu_computed']} computed on the CPU in {e['cpu_s'] * 1000:.0f} ms"
        return text


@dataclass
class RequestOutput:
    """One finished sequence. finish_reason: "stop" (eos, stop token or string) or "length"."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


@dataclass
class TokenEvent:
    """One streamed step of one sequence: the new text (may be empty while a stop string or a multi-byte
    character is pending) and, on the last event, finish_reason and the final stats. With
    SamplingParams.logprobs: the token's log-probability under the model (log-softmax of its logits,
    before any sampling setting) and the likeliest tokens' [(id, log-probability)]; none for a stop token,
    which is not part of the text."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    request_id: int = -1  # the engine's id of the request
