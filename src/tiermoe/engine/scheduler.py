"""Which requests run in the next step, and how many tokens each (nano-vllm's and vLLM v1's shape).

A request's tokens are its prompt and what it has generated; `num_computed` of them have their keys and
values in the cache. Each step schedules, for every running request, the tokens it still lacks: one for
a decoding request (its last sampled token), a chunk of at most the step's prefill budget for one still
reading its prompt. So a long prompt is read over several steps while the running requests keep
decoding, and requests join and leave at step boundaries.

Memory: a request holds KV blocks for its computed tokens. When a running request needs a block and none
is free, the newest running request is preempted: its blocks freed, it goes back to the front of the
queue and later recomputes its prompt and output so far (sampling resumes where it stopped). Admission
is first come, first served, and nothing is admitted in a step that preempted, so no request starves.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from ..offload.store import StoreStats
from .detokenizer import TextStream
from .kv_blocks import BlockPool
from .request import SamplingParams
from .sampler import Sampler


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: kept in sets and dicts by identity
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams  # resolved: every field set
    index: int = 0  # the caller's index for it (its position in a generate call's prompts)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    slot: int | None = None  # its row in per-sequence state (routing), held while running
    doc: int | None = None  # its document number for synthetic routing, kept across preemption
    preemptions: int = 0
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None
    # The engine's: how it samples, its text so far, and its share of the expert store's counts of the
    # steps it ran in, over all of them and over those after its first token.
    sampler: Sampler | None = None
    text: TextStream | None = None
    experts: StoreStats = field(default_factory=StoreStats)
    experts_decode: StoreStats = field(default_factory=StoreStats)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class Chunk:
    """`count` tokens of `request`, from its position `start`."""

    request: Request
    start: int
    count: int

    @property
    def completes(self) -> bool:
        """The chunk reaches the request's last token: its logits give the next token."""
        return self.start + self.count == self.request.num_tokens


@dataclass(frozen=True)
class StepPlan:
    chunks: list[Chunk]
    preempted: list[Request]


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, prefill_tokens: int):
        """prefill_tokens: prompt tokens a step reads at most (decode tokens come on top, one a request)."""
        self.pool, self.max_num_seqs, self.prefill_tokens = pool, max_num_seqs, prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget, chunks, preempted = self.prefill_tokens, [], []
        i = 0
        while i < len(self.running):
            request = self.running[i]
            count = self._count(request, budget)
            if count == 0:
                i += 1
                continue
            while not self.pool.grow(request.blocks, request.num_computed + count):
                victim = self.running[-1]  # the newest: the one that loses least work
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                chunks.append(Chunk(request, request.num_computed, count))
                budget -= count if count > 1 else 0
                i += 1
        while self.waiting and self._free_slots and budget > 0 and not preempted:
            request = self.waiting[0]
            count = self._count(request, budget)
            if not self.pool.grow(request.blocks, count):
                break
            self.waiting.popleft()
            request.status, request.slot = Status.RUNNING, self._free_slots.pop()
            self.running.append(request)
            chunks.append(Chunk(request, 0, count))
            budget -= count if count > 1 else 0
        return StepPlan(chunks, preempted)

    @staticmethod
    def _count(request: Request, budget: int) -> int:
        """Tokens to run for `request` this step: its last sampled token, or the next chunk of what it has
        not computed (its prompt, or prompt and output after a preemption) within the prefill budget."""
        left = request.num_tokens - request.num_computed
        return 1 if left == 1 else min(left, budget)

    def _preempt(self, request: Request) -> None:
        self._leave(request)
        request.status, request.num_computed = Status.WAITING, 0
        request.preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """The request is done (stopped, at its length, or aborted): its blocks and slot go back."""
        if request.status is Status.WAITING:
            self.waiting.remove(request)
            self.pool.release(request.blocks)
        elif request.status is Status.RUNNING:
            self._leave(request)
        request.status, request.finish_reason = Status.FINISHED, reason
        request.finish_s = time.perf_counter()

    def _leave(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request.blocks)
        self._free_slots.append(request.slot)
        request.slot = None
