"""Eviction policies for one layer's GPU slots, chosen by name, and the recent routing counts that
admission decisions rank misses by.

All policies see the same events: insert (a slot got a new expert, by demand or prefetch), touch (an
expert was used), and victim (pick a slot to overwrite, never one in `exclude`); victims(n) lists the
first n slots victim would pick one after the other (the in-place path hands them to the GPU)."""

from __future__ import annotations

from collections import OrderedDict
from itertools import chain, islice

import numpy as np

DECAY_STEPS = 64  # recent routing counts halve every this many decode steps, so old popularity fades
# LFU: a use this many touches of the layer ago weighs half of one now. Offline replays (bench/NOTES.md 52)
# of szd routing and of the trained demo model's traces: fewer misses than halving every 256 touches
# (the old rule) or 64, or than LRU, on every trace.
HALF_LIFE_TOUCHES = 64


class LRU:
    """Least recently used."""

    def __init__(self):
        self.order: OrderedDict[int, None] = OrderedDict()

    def insert(self, slot: int, prefetched: bool) -> None:
        self.order[slot] = None
        self.order.move_to_end(slot)

    def touch(self, slot: int) -> None:
        self.order.move_to_end(slot)

    def victim(self, exclude: set[int]) -> int:
        return next(s for s in self.order if s not in exclude)

    def victims(self, n: int) -> list[int]:
        return list(islice(self.order, n))


class LFU:
    """Least frequently used, each use decaying smoothly: one `half_life` touches of the layer ago weighs
    half of one now. Counts are kept in the scale of the latest use (a use weighs 2^(touches / half_life)
    there), so a touch changes one count, and the ranking is the decayed counts' (`value`); rescaled
    before the scale leaves float range."""

    def __init__(self, half_life: float = HALF_LIFE_TOUCHES):
        if not half_life >= 1:  # a shorter one overflows the scale between rescales (and NaN is not >= 1)
            raise ValueError(f"LFU's half-life is at least one touch, not {half_life}")
        self.counts: dict[int, float] = {}
        self.growth = 2.0 ** (1.0 / half_life)
        self.weight = 1.0  # what a use weighs now, in the counts' scale

    def value(self, slot: int) -> float:
        """The slot's decayed count: its uses, each weighing 2^(-touches since / half_life)."""
        return self.counts[slot] / self.weight

    def insert(self, slot: int, prefetched: bool) -> None:
        self.counts[slot] = 0.0 if prefetched else self.weight

    def touch(self, slot: int) -> None:
        self.weight *= self.growth
        self.counts[slot] += self.weight
        if self.weight > 2.0**512:
            for s in self.counts:
                self.counts[s] /= self.weight
            self.weight = 1.0

    def victim(self, exclude: set[int]) -> int:
        return min((c, s) for s, c in self.counts.items() if s not in exclude)[1]

    def victims(self, n: int) -> list[int]:
        return [s for _, s in sorted(zip(self.counts.values(), self.counts, strict=True))[:n]]


class ProtectPrefetchLRU(LRU):
    """LRU that spares slots prefetched but not yet used, so one prefetch cannot evict another's
    work before it had its chance; they go only when nothing else can."""

    def __init__(self):
        super().__init__()
        self.unused_prefetch: set[int] = set()

    def insert(self, slot: int, prefetched: bool) -> None:
        super().insert(slot, prefetched)
        if prefetched:
            self.unused_prefetch.add(slot)
        else:
            self.unused_prefetch.discard(slot)

    def touch(self, slot: int) -> None:
        super().touch(slot)
        self.unused_prefetch.discard(slot)

    def victim(self, exclude: set[int]) -> int:
        for s in self.order:
            if s not in exclude and s not in self.unused_prefetch:
                return s
        return super().victim(exclude)

    def victims(self, n: int) -> list[int]:
        spared = (s for s in self.order if s in self.unused_prefetch)
        return list(islice(chain((s for s in self.order if s not in self.unused_prefetch), spared), n))


POLICIES = {"lru": LRU, "lfu": LFU, "lru-protect": ProtectPrefetchLRU}


class RoutedCounts:
    """Pairs routed lately to each (layer, expert) in decode steps, halved every DECAY_STEPS of a layer's
    steps so that old popularity fades."""

    def __init__(self, layers: list[int], num_experts: int):
        self.row = {layer: r for r, layer in enumerate(layers)}
        self.freq = np.zeros((len(layers), num_experts))
        self.steps = np.zeros(len(layers), dtype=np.int64)

    def add(self, layer: int, routed: list[int]) -> None:
        r = self.row[layer]
        np.add.at(self.freq[r], routed, 1.0)
        self.steps[r] += 1
        if self.steps[r] % DECAY_STEPS == 0:
            self.freq[r] /= 2

    def add_step(self, routed: np.ndarray) -> None:
        """One decode step of every layer at once: routed [layers, pairs] in the order of `layers`."""
        np.add.at(self.freq, (np.arange(len(routed))[:, None], routed), 1.0)
        self.steps += 1
        self.freq[self.steps % DECAY_STEPS == 0] /= 2

    def of(self, layer: int) -> np.ndarray:
        return self.freq[self.row[layer]]
