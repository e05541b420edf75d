import pytest

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
    p = fill(LFU(half_life=4), [0, 1, 2])
    for _ in range(3):
        p.touch(0)
    p.touch(2)
    assert p.victim(set()) == 1
    assert p.victim({1}) == 2
    # slot 0: inserted 4 touches ago (1/2) and used 3, 2 and 1 touches ago
    assert abs(p.value(0) - sum(2 ** (-a / 4) for a in (4, 3, 2, 1))) < 1e-12
    for _ in range(8):  # 8 uses of slot 2 since: slot 0's five uses, 8 touches older, weigh a quarter
        p.touch(2)
    assert abs(p.value(0) - sum(2 ** (-a / 4) for a in (12, 11, 10, 9))) < 1e-12
    assert p.victims(3) == [1, 0, 2]


def test_lfu_rescales_before_its_scale_leaves_float_range():
    p = fill(LFU(half_life=1), [0, 1])
    for i in range(2000):  # 2^2000 would overflow a float
        p.touch(i % 2)
    assert p.weight < 2.0**513 and 0 < p.value(0) < 2 and 1 < p.value(1) < 2  # 1 was used last
    assert p.victim(set()) == 0
    with pytest.raises(ValueError, match="half-life"):
        LFU(half_life=0.5)


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
