"""The step loop: validate requests, prefill them as one batch, decode until every sequence stops,
and report each new piece of text as a TokenEvent."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InvalidRequestError
from ..offload.provider import ExpertProvider
from .detokenizer import TextStream
from .request import GenerationStats, SamplingParams, TokenEvent
from .runner import ModelRunner
from .sampler import Sampler


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        provider: ExpertProvider,
        tokenizer,
        eos_token_ids: set[int],
        max_model_len: int,
        sampling_defaults: dict | None = None,
    ):
        self.runner, self.provider, self.tokenizer = runner, provider, tokenizer
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        self.sampling_defaults = sampling_defaults or {}  # generation_config.json's, for unset fields

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer, and this checkpoint has none", "stop")
        vocab = self.runner.args.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt"
            )
        if len(prompt_ids) + (params.max_tokens or 1) > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens or 1}) exceeds the "
                f"model's context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )

    def resolve(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[SamplingParams]:
        """Every field set, and the batch held to the KV cache reserve of the memory plan: the left-padded
        batch needs rows x (longest prompt + max_tokens) slots. An unset max_tokens runs to the end of the
        context or of the reserve; a set one that does not fit is an error naming the limit."""
        for prompt, p in zip(prompts, params, strict=True):
            self.validate(prompt, p)
        width, rows = max(len(p) for p in prompts), len(prompts)
        per_row = self.runner.kv_tokens // rows
        room = min(self.max_model_len, per_row)
        needed = width + max(p.max_tokens or 1 for p in params)
        if needed > per_row:
            raise InvalidRequestError(
                f"the KV cache reserve holds {self.runner.kv_tokens} tokens (--kv-reserve-tokens, part of "
                f"the GPU budget); {rows} sequence(s) of up to {width} prompt tokens plus max_tokens "
                f"{max(p.max_tokens or 1 for p in params)} need {rows * needed}: lower max_tokens, send "
                "fewer prompts at once, or raise --kv-reserve-tokens",
                param="max_tokens",
            )
        return [p.resolved(self.sampling_defaults, room - width) for p in params]

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        """Generate for a batch; yields the events of each step. Closing the iterator aborts at once."""
        params = self.resolve(prompts, params)
        device = self.runner.device
        seqs = [
            Sequence(prompt, p, Sampler(p, device), TextStream(self.tokenizer, p.stop, p.skip_special_tokens))
            for prompt, p in zip(prompts, params, strict=True)
        ]
        stats = GenerationStats(sequences=len(prompts), prompt_tokens=sum(len(p) for p in prompts))
        self.provider.reset_stats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        max_len = max(len(p) for p in prompts) + max(p.max_tokens for p in params)
        cache = self.runner.cache_for(len(seqs), max_len)
        try:
            yield from self._generate(seqs, prompts, cache, stats)
        finally:  # also when the caller closes the stream early
            self.runner.end_run()

    def _generate(self, seqs, prompts, cache, stats: GenerationStats) -> Iterator[list[TokenEvent]]:
        device = self.runner.device
        start = time.perf_counter()
        logits, positions = self.runner.prefill(prompts, cache)
        tokens = self._sample(seqs, logits)
        scores = self._logprobs(seqs, logits, tokens)
        stats.ttft_s = stats.prefill_s = time.perf_counter() - start
        after_prefill = self.provider.stats()
        decode_start = time.perf_counter()
        while True:
            events = self._advance(seqs, tokens, scores)
            stats.completion_tokens = sum(len(s.output_ids) for s in seqs)
            done = all(s.finish_reason for s in seqs)
            if done:
                stats.decode_s = time.perf_counter() - decode_start
                self._finish_stats(stats, device, after_prefill)
                for e in events:
                    if e.finish_reason:
                        e.stats = stats
            yield events
            if done:
                return
            active = torch.tensor([s.finish_reason is None for s in seqs], device=device)
            token_tensor = torch.tensor([t if t is not None else 0 for t in tokens], device=device)
            logits = self.runner.decode(token_tensor, positions, active, cache)
            positions = positions + 1
            tokens = self._sample(seqs, logits)
            self.provider.after_step(len(seqs))  # the step is done: its tokens are on the host
            scores = self._logprobs(seqs, logits, tokens)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        if all(s.params.temperature == 0 and s.params.repetition_penalty == 1.0 for s in seqs):
            picked = logits.argmax(dim=-1).tolist()
        else:
            picked = []
            for row, s in enumerate(seqs):
                if s.finish_reason is not None:
                    picked.append(0)
                    continue
                # The token history crosses to the device only for the one setting that reads it.
                penalised = s.params.repetition_penalty != 1.0
                seen = torch.tensor(s.prompt_ids + s.output_ids, device=logits.device) if penalised else None
                picked.append(int(s.sampler(logits[row], seen)))
        return [t if s.finish_reason is None else None for t, s in zip(picked, seqs, strict=True)]

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: list[int | None]) -> list:
        """Per sequence that asked for them: (the picked token's log-probability, [(id, log-probability)]
        of the k likeliest), from the raw logits; None for the others."""
        out = []
        for row, (s, token) in enumerate(zip(seqs, tokens, strict=True)):
            if token is None or s.params.logprobs is None:
                out.append(None)
                continue
            scored = torch.log_softmax(logits[row].float(), dim=-1)
            top = torch.topk(scored, s.params.logprobs) if s.params.logprobs else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
            out.append((float(scored[token]), pairs))
        return out

    def _advance(self, seqs: list[Sequence], tokens: list[int | None], scores: list) -> list[TokenEvent]:
        events = []
        for i, (s, token, score) in enumerate(zip(seqs, tokens, scores, strict=True)):
            if token is None:
                continue
            s.output_ids.append(token)
            is_stop_token = token in s.params.stop_token_ids or (
                not s.params.ignore_eos and token in self.eos_token_ids
            )
            text = "" if is_stop_token else s.text.push(token)
            if is_stop_token or s.text.stopped:
                s.finish_reason = "stop"
            elif len(s.output_ids) >= s.params.max_tokens:
                s.finish_reason = "length"
            if s.finish_reason:
                text += s.text.flush()
            event = TokenEvent(i, token, text, s.finish_reason)
            if score is not None and not is_stop_token:
                event.logprob, event.top_logprobs = score
            events.append(event)
        return events

    def _finish_stats(self, stats: GenerationStats, device: torch.device, after_prefill: dict) -> None:
        if device.type == "cuda":
            stats.peak_gpu_gib = torch.cuda.max_memory_allocated(device) / 2**30
        stats.peak_host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        stats.experts = self.provider.stats()
        stats.experts_decode = self.provider.stats(since=after_prefill) if after_prefill else {}
