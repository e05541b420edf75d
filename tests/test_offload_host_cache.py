"""The host cache's reader threads: a layer's misses read at once, read-aheads waited for only when
used, LRU eviction never reusing a buffer whose read is still running."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiermoe.formats.dense import DenseFormat
from tiermoe.offload.host_cache import HostCache

FMT = DenseFormat(64, 32, torch.float32)


class SlowSource:
    """Writes (layer, expert) into the expert's first bytes after a delay; records reads in flight."""

    description = "slow test source"

    def __init__(self, delay_s: float = 0.05):
        self.delay_s, self.lock = delay_s, threading.Lock()
        self.active = self.most_active = self.reads = 0

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        with self.lock:
            self.active += 1
            self.reads += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay_s)
        out[:2] = torch.tensor([layer, expert], dtype=torch.uint8)
        with self.lock:
            self.active -= 1
        return out.numel()


def test_read_ahead_reads_in_parallel_and_get_returns_the_bytes():
    source = SlowSource()
    cache = HostCache(source, capacity=6, fmt=FMT, pinned=False, readers=4)
    keys = [(3, e) for e in range(4)]
    cache.read_ahead(keys)
    entries = [cache.get(*key) for key in keys]
    assert source.most_active >= 2  # several reads were in flight at once
    assert not any(hit for _, hit in entries)  # each was read from the source (by the read-ahead)
    for (layer, e), (entry, _) in zip(keys, entries, strict=True):
        assert cache.buffer(entry)[:2].tolist() == [layer, e]
    assert cache.source_reads == 4 and source.reads == 4 and cache.wait_s > 0
    entry, hit = cache.get(3, 0)  # held now
    assert hit and source.reads == 4
    entry, hit = cache.get(5, 1)  # a plain miss reads here
    assert not hit and cache.buffer(entry)[:2].tolist() == [5, 1]


def test_eviction_waits_for_an_unused_read_ahead_and_keeps_lru_order():
    source = SlowSource(delay_s=0.02)
    cache = HostCache(source, capacity=2, fmt=FMT, pinned=False, readers=2)
    cache.read_ahead([(0, 0), (0, 1), (0, 2)])  # more than it holds: only the first two are read
    assert source.reads <= 2 and cache.source_reads == 2
    cache.get(0, 0)
    entry, hit = cache.get(1, 7)  # evicts (0, 1), whose read may still run: it finishes first
    assert not hit and cache.buffer(entry)[:2].tolist() == [1, 7]
    assert set(cache.entry_of) == {(0, 0), (1, 7)}


def test_a_failed_read_surfaces_where_the_expert_is_needed():
    class Broken(SlowSource):
        def read_into(self, layer, expert, out):
            raise OSError("disk gone")

    cache = HostCache(Broken(), capacity=2, fmt=FMT, pinned=False)
    cache.read_ahead([(0, 0)])
    with pytest.raises(OSError, match="disk gone"):
        cache.get(0, 0)
    assert (0, 0) not in cache.entry_of and len(cache.free) == 2  # not held: the next get reads again
