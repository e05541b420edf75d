"""Eviction policies for one layer's GPU slots, chosen by name.

All see the same events: insert (a slot got a new expert, by demand or prefetch), touch (an expert was
used), and victim (pick a slot to overwrite, never one in `exclude`)."""

from __future__ import annotations

from collections import OrderedDict


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


class LFU:
    """Least frequently used, with counts halved every `decay_every` touches so old popularity fades."""

    def __init__(self, decay_every: int = 256):
        self.counts: dict[int, float] = {}
        self.decay_every, self.touches = decay_every, 0

    def insert(self, slot: int, prefetched: bool) -> None:
        self.counts[slot] = 0.0 if prefetched else 1.0

    def touch(self, slot: int) -> None:
        self.counts[slot] += 1.0
        self.touches += 1
        if self.touches % self.decay_every == 0:
            for s in self.counts:
                self.counts[s] /= 2

    def victim(self, exclude: set[int]) -> int:
        return min((c, s) for s, c in self.counts.items() if s not in exclude)[1]


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


POLICIES = {"lru": LRU, "lfu": LFU, "lru-protect": ProtectPrefetchLRU}
