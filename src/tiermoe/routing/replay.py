"""Offline replay of a routing trace through the engine's per-layer GPU expert cache, and the locality
statistics of ROUTING.md.

`replay` walks the trace step by step and layer by layer and admits each step's experts through the
very calls `TieredExpertStore.forward` makes with prefetch off (`LayerSlots.schedule`, then
`LayerSlots.admit` over its waves, on the engine's own eviction policies), so its hit rate equals the GPU hit
rate the engine measures on the same routing. A step's routed ids are flattened as the engine flattens
ids [T, k] (T = batch rows x tokens, row-major): the trace's (seq, token) order.

Trace rows must hold the expert ids in the router's order (top-k, most probable first): `waves` breaks
ties of routing counts by first occurrence, so the order decides which expert of a tied pair loads first.

"belady" is the offline optimum under the same token-batched admission: all of a step's experts are
looked up first, then the missing ones admitted, each evicting the resident expert whose next use in
that layer is farthest in the future.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequestError
from ..offload.gpu_pool import LayerSlots
from ..offload.policy import POLICIES
from .trace import Trace

REPLAY_POLICIES = (*POLICIES, "belady")


@dataclass(frozen=True)
class Admission:
    """One engine step's lookup in one MoE layer."""

    step: int
    layer: int
    prefill: bool  # any of the step's tokens is a prompt token
    routed: list[int]  # expert ids of the step's tokens, flattened as store.forward flattens ids [T, k]


@dataclass
class CacheCounts:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    def add(self, other: CacheCounts) -> None:
        self.hits += other.hits
        self.misses += other.misses


@dataclass
class LayerReplay:
    slots: int
    all: CacheCounts = field(default_factory=CacheCounts)  # every step, as the engine counts
    decode: CacheCounts = field(default_factory=CacheCounts)  # decode steps only


@dataclass
class ReplayResult:
    policy: str
    layers: dict[int, LayerReplay]

    def _total(self, phase: str) -> CacheCounts:
        total = CacheCounts()
        for lr in self.layers.values():
            total.add(getattr(lr, phase))
        return total

    @property
    def hits(self) -> int:
        return self._total("all").hits

    @property
    def misses(self) -> int:
        return self._total("all").misses

    @property
    def hit_rate(self) -> float | None:
        """hits / (hits + misses) over every step: the engine's `gpu_hit_rate` with prefetch off."""
        return self._total("all").hit_rate

    @property
    def decode_hit_rate(self) -> float | None:
        return self._total("decode").hit_rate

    def to_dict(self) -> dict:
        def counts(c: CacheCounts) -> dict:
            return {"hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate}

        return {
            "policy": self.policy,
            **counts(self._total("all")),
            "decode": counts(self._total("decode")),
            "layers": {
                str(layer): {"slots": lr.slots, **counts(lr.all), "decode": counts(lr.decode)}
                for layer, lr in self.layers.items()
            },
        }


def admissions(trace: Trace) -> list[Admission]:
    """The trace as the engine's sequence of (step, layer) lookups, in the order the engine makes them."""
    out = []
    for a, b in _runs(trace.step, trace.layer):  # rows are sorted by (step, layer, seq, token)
        out.append(
            Admission(
                int(trace.step[a]),
                int(trace.layer[a]),
                bool(trace.prefill[a:b].any()),
                trace.experts[a:b].reshape(-1).tolist(),  # [rows, k] -> token-major, as ids.reshape(-1)
            )
        )
    return out


def _runs(*keys: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of rows on which every key is constant (keys sorted, of equal length)."""
    n = len(keys[0])
    if n == 0:
        return []
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= np.diff(key) != 0
    return list(itertools.pairwise([0, *(np.flatnonzero(change) + 1).tolist(), n]))


def replay(trace: Trace, slots_per_layer: int | dict[int, int], policy: str) -> ReplayResult:
    """Hits and misses of a per-layer expert cache of `slots_per_layer` slots (one count for every layer,
    or layer -> count) under `policy` ("lru", "lfu", "lru-protect" or "belady") over the trace."""
    return replay_admissions(admissions(trace), _quotas(trace, slots_per_layer), policy)


def replay_admissions(steps: list[Admission], quotas: dict[int, int], policy: str) -> ReplayResult:
    """`replay` on the trace's admissions, computed once when one trace is replayed many times."""
    if policy not in REPLAY_POLICIES:
        raise InvalidRequestError(
            f"unknown cache policy {policy!r}; choose one of {', '.join(REPLAY_POLICIES)}", "policy"
        )
    uses = next_uses(steps) if policy == "belady" else {}
    parts = {layer: _layer_slots(n, policy, uses.get(layer, {})) for layer, n in quotas.items()}
    result = ReplayResult(policy, {layer: LayerReplay(n) for layer, n in quotas.items()})
    for adm in steps:
        part = parts[adm.layer]
        if isinstance(part.policy, Belady):
            part.policy.now = adm.step
        counts = _admit(part, adm.routed)
        figures = result.layers[adm.layer]
        figures.all.add(counts)
        if not adm.prefill:
            figures.decode.add(counts)
    return result


def _quotas(trace: Trace, slots_per_layer: int | dict[int, int]) -> dict[int, int]:
    if isinstance(slots_per_layer, dict):
        missing = [layer for layer in trace.layers if layer not in slots_per_layer]
        if missing:
            raise InvalidRequestError(f"no slot count for MoE layers {missing}", "slots")
        quotas = {layer: int(slots_per_layer[layer]) for layer in trace.layers}
    else:
        quotas = dict.fromkeys(trace.layers, int(slots_per_layer))
    if any(n < 1 for n in quotas.values()):
        raise InvalidRequestError("every MoE layer needs at least one expert slot", "slots")
    return quotas


def _layer_slots(n: int, policy: str, uses: dict[int, list[int]]) -> LayerSlots:
    """The engine's slot partition of one layer. Slot numbers start at 0 rather than at the layer's offset
    in the pool: they only break LFU ties by order, which an offset does not change."""
    if policy != "belady":
        return LayerSlots(range(n), policy)
    part = LayerSlots(range(n), "lru")
    # LayerSlots builds policies from their name alone; Belady also needs the future, so it is swapped in.
    part.policy = Belady(uses, part.expert_of)
    return part


def _admit(part: LayerSlots, routed: list[int]) -> CacheCounts:
    """One step's lookup in one layer, through the very calls store.forward makes, without the copies."""
    counts = CacheCounts()

    def hit(slot: int) -> None:
        counts.hits += 1

    def load(expert: int, exclude: set[int]) -> int:
        counts.misses += 1
        return part.claim(expert, exclude, prefetched=False)

    for _ in part.admit(part.schedule(routed), hit, load):
        pass
    return counts


def next_uses(steps: list[Admission]) -> dict[int, dict[int, list[int]]]:
    """layer -> expert -> the steps (ascending) in which that layer routes that expert."""
    uses: dict[int, dict[int, list[int]]] = {}
    for adm in steps:
        layer = uses.setdefault(adm.layer, {})
        for e in set(adm.routed):
            layer.setdefault(e, []).append(adm.step)
    return uses


class Belady:
    """Evicts the resident expert whose next use after the current step is farthest away (never used
    again counts as infinitely far); ties go to the lowest slot. Same events as offload/policy.py;
    `now` is set to the step being admitted before each lookup.

    A slot's next use is looked up when it is filled or used: until then the expert is not routed (or it
    would be used), so the figure stays right while it waits."""

    def __init__(self, uses: dict[int, list[int]], expert_of: dict[int, int]):
        self.uses, self.expert_of, self.now = uses, expert_of, -1
        self.next_use: dict[int, float] = {}  # slot -> step of its expert's next use

    def insert(self, slot: int, prefetched: bool) -> None:
        self.touch(slot)

    def touch(self, slot: int) -> None:
        steps = self.uses.get(self.expert_of[slot], [])
        i = bisect_right(steps, self.now)
        self.next_use[slot] = steps[i] if i < len(steps) else math.inf

    def victim(self, exclude: set[int]) -> int:
        candidates = [s for s in self.expert_of if s not in exclude]
        return max(candidates, key=lambda s: (self.next_use[s], -s))


# Locality of routing (ROUTING.md, "What trained models do")


@dataclass
class Locality:
    tokens: int  # tokens counted: those with at least one earlier counted token of their sequence
    overlap: float | None  # mean share of a token's k experts the previous token also used
    reuse: float | None  # mean share of a token's k experts any of the previous `window` tokens used


@dataclass
class LocalityReport:
    window: int
    include_prefill: bool
    overall: Locality
    layers: dict[int, Locality]

    def to_dict(self) -> dict:
        return {
            "window": self.window,
            "tokens": "all" if self.include_prefill else "decode",
            "overall": vars(self.overall),
            "layers": {str(layer): vars(loc) for layer, loc in self.layers.items()},
        }


def locality(trace: Trace, window: int = 8, include_prefill: bool = False) -> LocalityReport:
    """Consecutive-token overlap and reuse within `window` tokens, per MoE layer and pooled over layers.

    Counted over decode tokens unless `include_prefill` (prefill touches nearly every expert, and decode is
    where a cache pays). A token's predecessors are the earlier counted tokens of its sequence in the same
    layer, by position; the first counted token of a sequence has none and is skipped, and a token with
    fewer than `window` predecessors is compared with those it has."""
    keep = np.ones(len(trace), dtype=bool) if include_prefill else ~trace.prefill
    seq, token, layer, experts = trace.seq[keep], trace.token[keep], trace.layer[keep], trace.experts[keep]
    num_experts = max(trace.num_experts, int(experts.max()) + 1 if len(experts) else 0)
    sums: dict[int, np.ndarray] = {}  # layer -> [tokens, overlap sum, reuse sum]
    order = np.lexsort((token, seq, layer))
    for a, b in _runs(layer[order], seq[order]):
        rows = order[a:b]
        acc = sums.setdefault(int(layer[rows[0]]), np.zeros(3))
        acc += _sequence_locality(experts[rows], num_experts, window)
    layers = {ly: _mean(acc) for ly, acc in sorted(sums.items())}
    overall = _mean(sum(sums.values(), np.zeros(3)))
    return LocalityReport(window, include_prefill, overall, layers)


def _sequence_locality(experts: np.ndarray, num_experts: int, window: int) -> np.ndarray:
    """[tokens counted, sum of overlap shares, sum of reuse shares] of one sequence in one layer.
    experts: [n, k], the sequence's tokens in position order."""
    n, k = experts.shape
    if n < 2:
        return np.zeros(3)
    used = np.zeros((n, num_experts), dtype=np.int64)  # [n, E]: 1 where token i routes expert e
    np.put_along_axis(used, experts, 1, axis=1)
    before = np.concatenate(
        [np.zeros((1, num_experts), np.int64), used.cumsum(0)]
    )  # [n + 1, E]: uses in tokens < i
    t = np.arange(1, n)  # tokens with a predecessor
    in_prev = used[t - 1]  # [n - 1, E]
    in_window = before[t] - before[np.maximum(t - window, 0)]  # [n - 1, E]: uses in tokens t-window .. t-1
    mine = experts[t]  # [n - 1, k]
    overlap = np.take_along_axis(in_prev, mine, axis=1).astype(bool).sum(1) / k  # [n - 1]
    reuse = (np.take_along_axis(in_window, mine, axis=1) > 0).sum(1) / k  # [n - 1]
    return np.array([n - 1, overlap.sum(), reuse.sum()])


def _mean(acc: np.ndarray) -> Locality:
    tokens = int(acc[0])
    if tokens == 0:
        return Locality(0, None, None)
    return Locality(tokens, float(acc[1] / tokens), float(acc[2] / tokens))
