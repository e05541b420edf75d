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


def test_victims_lists_the_picks_victim_makes_one_after_the_other():
    """The in-place path hands the GPU a layer's next victims at once: they must be the slots victim()
    would pick in turn, each pick excluded from the next."""
    lfu = fill(LFU(), [0, 1, 2, 3, 4])
    for s in (3, 3, 0, 4, 4, 4):
        lfu.touch(s)
    protect = fill(ProtectPrefetchLRU(), [0, 1, 2, 3, 4], prefetched={1, 3})
    protect.touch(3)
    lru = fill(LRU(), [0, 1, 2, 3, 4])
    lru.touch(1)
    for policy, expected in ((lru, [0, 2, 3, 4]), (lfu, [1, 2, 0, 3]), (protect, [0, 2, 4, 3])):
        picks, exclude = [], set()
        for _ in range(4):
            picks.append(policy.victim(exclude))
            exclude.add(picks[-1])
        assert policy.victims(4) == picks == expected, type(policy).__name__
