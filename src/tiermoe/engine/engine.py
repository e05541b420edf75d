"""The step engine: requests are added, each `step` runs what the scheduler plans (new prompt chunks and
every running sequence's next token, as few forwards as the runner needs), samples, and reports each new
piece of text as a TokenEvent; `abort` drops a request at the next step boundary. `run` drives the engine
alone for a batch of prompts (LLM.generate and LLM.stream); the server interleaves many requests."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator

import torch

from ..errors import InvalidRequestError, TiermoeError
from ..models.kv_cache import slots_of
from ..offload.provider import ExpertProvider
from ..offload.store import StoreStats
from .detokenizer import TextStream
from .kv_blocks import BlockPool
from .request import GenerationStats, SamplingParams, TokenEvent
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Chunk, Request, Scheduler


class KVCacheBusy(TiermoeError):
    """Scoring a prompt needs KV blocks that running requests hold."""

    http_status = 503
    error_type = "server_error"
    code = "kv_cache_busy"


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        provider: ExpertProvider,
        tokenizer,
        eos_token_ids: set[int],
        max_model_len: int,
        sampling_defaults: dict | None = None,
        max_num_seqs: int = 16,
    ):
        self.runner, self.provider, self.tokenizer = runner, provider, tokenizer
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        self.sampling_defaults = sampling_defaults or {}  # generation_config.json's, for unset fields
        self.pool = BlockPool(runner.num_blocks)
        self.scheduler = Scheduler(self.pool, max_num_seqs, runner.prefill_chunk)
        self._next_id = 0
        self.last_batch = 0  # sequences in the last step (the server's metrics)
        self.last_step_experts = StoreStats()  # the expert store's counts of the last step
        self._store_info: dict = {}  # the store's last stats(): its settings beside the counts

    # --- requests
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
        kv = self.runner.kv_tokens
        if len(prompt_ids) + (params.max_tokens or 1) > kv:
            raise InvalidRequestError(
                f"the KV cache reserve holds {kv} tokens (--kv-reserve-tokens, part of the GPU budget); the "
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens or 1}) needs more: "
                "lower max_tokens, shorten the prompt, or raise --kv-reserve-tokens",
                param="max_tokens",
            )

    def resolve(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Every field set; an unset max_tokens runs to the end of the context or of the KV reserve."""
        self.validate(prompt_ids, params)
        room = min(self.max_model_len, self.runner.kv_tokens)
        return params.resolved(self.sampling_defaults, room - len(prompt_ids))

    def add_request(self, prompt_ids: list[int], params: SamplingParams, index: int = 0) -> Request:
        """Queue a request (validated first: a bad one raises and nothing is queued)."""
        params = self.resolve(prompt_ids, params)
        request = Request(self._next_id, list(prompt_ids), params, index)
        request.sampler = Sampler(params, self.runner.device)
        request.text = TextStream(self.tokenizer, params.stop, params.skip_special_tokens)
        self._next_id += 1
        self.scheduler.add(request)
        return request

    def abort(self, request: Request) -> None:
        """Drop a request now (between steps): its KV blocks are free for the next step."""
        if not request.finished:
            self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- one step
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        self.last_batch, self.last_step_experts = len(plan.chunks), StoreStats()
        if not plan.chunks:
            return []
        routing = self.runner.routing
        for c in plan.chunks:
            if c.start == 0 and routing:  # a sequence starts, or restarts after a preemption
                c.request.doc = routing.begin_sequence(c.request.slot, c.request.doc)
        rows = [i for i, c in enumerate(plan.chunks) if c.completes]  # before the requests advance
        completing = [plan.chunks[i] for i in rows]
        before = self.provider.stats()
        logits = self.runner.execute(plan.chunks)
        for c in plan.chunks:
            c.request.num_computed += c.count
        if len(rows) < len(plan.chunks):  # some prompts are still being read
            logits = logits[rows]
        tokens = self._sample(completing, logits)
        if any(c.count == 1 for c in plan.chunks):  # the step is done: its tokens are on the host
            self.provider.after_step(self.runner.decoded_rows)
        self._attribute(plan.chunks, before)
        scores = self._logprobs(completing, logits, tokens)
        events = [self._advance(c.request, t, s) for c, t, s in zip(completing, tokens, scores, strict=True)]
        self._flush_if_idle()
        return events

    def _attribute(self, chunks: list[Chunk], before: dict) -> None:
        """The step's expert-store counts (last_step_experts), shared among its requests in proportion to
        the tokens each ran: an expert loaded once for four decoding sequences counts a quarter to each."""
        delta = self.provider.stats(since=before)
        if not delta:  # no expert store: nothing to count
            return
        self._store_info = delta  # its descriptive fields (format, policy, ...) for stats_of
        self.last_step_experts = step = StoreStats.of(delta)
        total = sum(c.count for c in chunks)
        for c in chunks:
            r = c.request
            r.experts = r.experts.plus(step, c.count / total)
            if r.first_token_s is not None:  # a decode step of r (or a recompute after its preemption)
                r.experts_decode = r.experts_decode.plus(step, c.count / total)

    def _flush_if_idle(self) -> None:
        """Nothing left to run: a routing recorder writes its trace (it holds back while busy)."""
        if self.runner.routing and not self.scheduler.has_work():
            self.runner.routing.flush()

    def _sample(self, chunks: list[Chunk], logits: torch.Tensor) -> list[int]:
        requests = [c.request for c in chunks]
        if all(r.params.temperature == 0 and r.params.repetition_penalty == 1.0 for r in requests):
            return logits.argmax(dim=-1).tolist()
        picked = []
        for row, r in enumerate(requests):
            # The token history crosses to the device only for the one setting that reads it.
            penalised = r.params.repetition_penalty != 1.0
            seen = torch.tensor(r.prompt_ids + r.output_ids, device=logits.device) if penalised else None
            picked.append(int(r.sampler(logits[row], seen)))
        return picked

    @staticmethod
    def _logprobs(chunks: list[Chunk], logits: torch.Tensor, tokens: list[int]) -> list:
        """Per request that asked for them: (the picked token's log-probability, [(id, log-probability)]
        of the k likeliest), from the raw logits; None for the others."""
        out = []
        for row, (c, token) in enumerate(zip(chunks, tokens, strict=True)):
            k = c.request.params.logprobs
            if k is None:
                out.append(None)
                continue
            scored = torch.log_softmax(logits[row].float(), dim=-1)
            top = torch.topk(scored, k) if k else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
            out.append((float(scored[token]), pairs))
        return out

    def _advance(self, r: Request, token: int, score) -> TokenEvent:
        if r.first_token_s is None:
            r.first_token_s = time.perf_counter()
        r.output_ids.append(token)
        is_stop_token = token in r.params.stop_token_ids or (
            not r.params.ignore_eos and token in self.eos_token_ids
        )
        text = "" if is_stop_token else r.text.push(token)
        reason = None
        if is_stop_token or r.text.stopped:
            reason = "stop"
        elif len(r.output_ids) >= r.params.max_tokens:
            reason = "length"
        if reason:
            text += r.text.flush()
        event = TokenEvent(r.index, token, text, reason, request_id=r.id)
        if score is not None and not is_stop_token:
            event.logprob, event.top_logprobs = score
        if reason:
            self._finish(r, reason)
            event.stats = self.stats_of([r])
        return event

    def _finish(self, r: Request, reason: str) -> None:
        routing = self.runner.routing
        if routing and r.doc is not None:  # its recorded routing, read from its blocks before they go
            routing.end_sequence(r.doc, len(r.prompt_ids), slots_of(r.blocks, r.num_computed))
        self.scheduler.finish(r, reason)

    def stats_of(self, requests: list[Request]) -> GenerationStats:
        """Timing, memory and expert figures of requests, as one batch: from the first arrival to the
        last first token (prefill), then to the last finish (decode)."""
        start = min(r.arrival_s for r in requests)
        first = max(r.first_token_s or start for r in requests)
        end = max(r.finish_s or first for r in requests)
        device = self.runner.device
        stats = GenerationStats(
            sequences=len(requests),
            prompt_tokens=sum(len(r.prompt_ids) for r in requests),
            completion_tokens=sum(len(r.output_ids) for r in requests),
            ttft_s=first - start,
            prefill_s=first - start,
            decode_s=end - first,
            peak_gpu_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
            peak_host_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        )
        # The requests' shares of the steps they ran in: the whole store's counts when they ran alone.
        setup = self._store_info
        if setup:  # a provider without a store has no counts
            whole, decode = StoreStats(), StoreStats()
            for r in requests:
                whole, decode = whole.plus(r.experts), decode.plus(r.experts_decode)
            stats.experts, stats.experts_decode = {**setup, **whole.to_dict()}, {**setup, **decode.to_dict()}
        return stats

    # --- a batch, driving the engine alone
    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        """Generate for a batch; yields each step's events (index: the prompt's). The last request to
        finish carries the stats of the whole batch. Closing the iterator aborts the batch at once."""
        for prompt, p in zip(prompts, params, strict=True):
            self.validate(prompt, p)  # all of them before any is queued
        if not self.has_unfinished() and self.runner.device.type == "cuda":  # the peak of this batch alone
            torch.cuda.reset_peak_memory_stats(self.runner.device)
        requests = [
            self.add_request(prompt, p, i) for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
        ]
        try:
            done = False
            while not done:
                events = self.step()
                if done := all(r.finished for r in requests):
                    batch = self.stats_of(requests)
                    for e in events:
                        if e.finish_reason:
                            e.stats = batch
                if events:
                    yield events
        finally:  # also when the caller closes the stream early
            for r in requests:
                self.abort(r)
            self._flush_if_idle()

    def score(self, ids: list[int], top: int = 0):
        """ModelRunner.logprobs of one sequence in KV blocks taken for it and given back."""
        blocks: list[int] = []
        if len(ids) > self.runner.kv_tokens:
            raise InvalidRequestError(
                f"{len(ids)} tokens do not fit the KV cache reserve of {self.runner.kv_tokens} tokens "
                "(--kv-reserve-tokens)",
                "prompt",
            )
        if not self.pool.grow(blocks, len(ids)):
            raise KVCacheBusy("the KV cache is held by running requests; try again shortly")
        try:
            return self.runner.logprobs(ids, blocks, top=top)
        finally:
            self.pool.release(blocks)
            self._flush_if_idle()
