"""Experts in host memory (pinned when there is a GPU, so copies run asynchronously at full speed),
LRU over all layers, filled from an ExpertSource (disk or generator) on a miss."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..formats.base import ExpertFormat
from .sources import ExpertSource

# Pinned allocations are rounded up to a power of two by torch's host allocator: allocate in chunks of
# exactly this size so the rounding wastes at most one expert per chunk.
CHUNK_BYTES = 1 << 30


class HostCache:
    def __init__(self, source: ExpertSource, capacity: int, fmt: ExpertFormat, pinned: bool):
        self.source, self.capacity = source, capacity
        per_chunk = max(1, CHUNK_BYTES // fmt.nbytes)
        self.chunks = []  # uint8 [n, expert bytes] each
        left = capacity
        while left > 0:
            n = min(per_chunk, left)
            self.chunks.append(fmt.empty(n, pin_memory=pinned))
            left -= n
        self.per_chunk = per_chunk
        self.entry_of: OrderedDict[tuple[int, int], int] = (
            OrderedDict()
        )  # (layer, expert) -> entry, LRU order
        self.key_of: dict[int, tuple[int, int]] = {}
        self.free = list(reversed(range(capacity)))
        self.in_flight: dict[int, torch.cuda.Event] = {}  # entry -> event of a copy reading it

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def buffer(self, entry: int) -> torch.Tensor:
        return self.chunks[entry // self.per_chunk][entry % self.per_chunk]

    def get(self, layer: int, expert: int) -> tuple[int, bool]:
        """The entry holding (layer, expert), reading it from the source on a miss. Returns (entry, hit)."""
        key = (layer, expert)
        if key in self.entry_of:
            self.entry_of.move_to_end(key)
            return self.entry_of[key], True
        if self.free:
            entry = self.free.pop()
        else:
            _, entry = self.entry_of.popitem(last=False)
            del self.key_of[entry]
            event = self.in_flight.pop(entry, None)
            if event is not None:  # a copy to the GPU still reads this entry
                event.synchronize()
        self.source.read_into(layer, expert, self.buffer(entry))
        self.entry_of[key] = entry
        self.key_of[entry] = key
        return entry, False

    def reading(self, entry: int, event) -> None:
        """Note that a copy ending with `event` reads this entry, so it is not overwritten before."""
        if event is not None:
            self.in_flight[entry] = event
