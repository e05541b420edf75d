from tiermoe.offload.policy import LFU, LRU, ProtectPrefetchLRU


def fill(policy, slots, prefetched=()):
    for s in slots:
        policy.insert(s, s in prefetched)
    return policy


def test_lru_evicts_least_recently_used_outside_exclude():
    p = fill(LRU(), [0, 1, 2])
    p.touch(0)
    assert p.victim(set()) == 1
    assert p.victim({1}) == 2


def test_lfu_evicts_least_used_and_decays():
    p = fill(LFU(decay_every=4), [0, 1, 2])
    for _ in range(3):
        p.touch(0)
    p.touch(2)
    assert p.victim(set()) == 1
    assert p.counts[0] == 2.0  # 4 touches so far: every count halved once (4 -> 2)
    assert p.victim({1}) == 2


def test_protect_spares_unused_prefetch_until_nothing_else():
    p = fill(ProtectPrefetchLRU(), [0, 1, 2], prefetched={0})
    assert p.victim(set()) == 1  # 0 is older but was prefetched and not used yet
    p.touch(0)
    assert p.victim(set()) == 1
    p2 = fill(ProtectPrefetchLRU(), [0, 1], prefetched={0, 1})
    assert p2.victim(set()) == 0  # only protected slots left: plain LRU
