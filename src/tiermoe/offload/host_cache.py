"""Experts in host memory (pinned when there is a GPU, so copies run asynchronously at full speed),
LRU over all layers, filled from an ExpertSource (disk or generator) on a miss.

Reads from the source run on a pool of reader threads: `read_ahead` starts reading experts a later
step will need (a layer's misses at once, so the disk sees a queue of reads rather than one at a time;
the predicted experts of the next layer), and `get` waits only for the read of the expert it returns.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..formats.base import ExpertFormat
from .sources import ExpertSource

# Pinned allocations are rounded up to a power of two by torch's host allocator: allocate in chunks of
# exactly this size so the rounding wastes at most one expert per chunk.
CHUNK_BYTES = 1 << 30
READERS = 4  # reads in flight: an NVMe drive needs a queue of several to reach its bandwidth


class HostCache:
    def __init__(
        self, source: ExpertSource, capacity: int, fmt: ExpertFormat, pinned: bool, readers: int = READERS
    ):
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
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="tiermoe-reader") if readers else None
        self.reads: dict[int, Future] = {}  # entry -> its read from the source, not yet waited for
        self.source_reads = 0  # experts read from the source (disk)
        self.wait_s = 0.0  # time get() blocked on reads

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def buffer(self, entry: int) -> torch.Tensor:
        return self.chunks[entry // self.per_chunk][entry % self.per_chunk]

    def get(self, layer: int, expert: int) -> tuple[int, bool]:
        """The entry holding (layer, expert), once its bytes are there: read from the source on a miss,
        waited for when a read-ahead is still reading it. Returns (entry, hit): hit when no read started
        here nor by a read-ahead (each read is counted once, in source_reads)."""
        key = (layer, expert)
        held = key in self.entry_of
        entry = self.entry_of[key] if held else self._claim(key)
        hit = held and entry not in self.reads
        self.entry_of.move_to_end(key)
        future = self.reads.pop(entry, None)
        if future is not None:
            start = time.perf_counter()
            try:
                future.result()  # the read's error surfaces here, where the expert is needed
            except BaseException:
                del self.entry_of[key], self.key_of[entry]  # not held: a later get reads it again
                self.free.append(entry)
                raise
            finally:
                self.wait_s += time.perf_counter() - start
        return entry, hit

    def holds(self, layer: int, expert: int) -> bool:
        """Whether the expert's bytes are here now (held, and no read of it still running)."""
        entry = self.entry_of.get((layer, expert))
        return entry is not None and (entry not in self.reads or self.reads[entry].done())

    def read_ahead(self, keys: list[tuple[int, int]]) -> None:
        """Start reading the experts of `keys` not yet held, on the reader threads (at most as many as
        the cache holds, so a read-ahead never evicts another one's expert). Those already held become
        the most recently used first, so that the reads do not evict them."""
        if self.pool is None:
            return
        keys = list(dict.fromkeys(keys))
        for key in keys:
            if key in self.entry_of:
                self.entry_of.move_to_end(key)
        for key in [k for k in keys if k not in self.entry_of][: self.capacity]:
            self._claim(key)

    def _claim(self, key: tuple[int, int]) -> int:
        """An entry for key (the LRU one's when full) with its read from the source started."""
        if self.free:
            entry = self.free.pop()
        else:
            _, entry = self.entry_of.popitem(last=False)
            del self.key_of[entry]
            pending = self.reads.pop(entry, None)
            if pending is not None:  # a read-ahead nobody used: let it finish before reusing its buffer
                pending.exception()  # waits; a failed read needs no more than that, its bytes are dropped
            event = self.in_flight.pop(entry, None)
            if event is not None:  # a copy to the GPU still reads this entry
                event.synchronize()
        self.entry_of[key] = entry
        self.key_of[entry] = key
        self.source_reads += 1
        buffer = self.buffer(entry)
        if self.pool is None:
            self.source.read_into(*key, buffer)
        else:
            self.reads[entry] = self.pool.submit(self.source.read_into, *key, buffer)
        return entry

    def reading(self, entry: int, event) -> None:
        """Note that a copy ending with `event` reads this entry, so it is not overwritten before."""
        if event is not None:
            self.in_flight[entry] = event
