"""The fixed pool of expert slots on the GPU, partitioned by layer.

A decode step visits the layers in a cycle; one global LRU would evict each layer's experts just
before the next token needs them again. Per-layer partitions (as in mixtral-offloading) keep each
layer's recent experts, and the eviction policy chooses within a layer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import torch

from ..formats.base import ExpertFormat
from .policy import POLICIES


class LayerSlots:
    def __init__(self, slots: range, policy: str):
        self.slots = slots
        self.policy = POLICIES[policy]()
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.expert_of: dict[int, int] = {}  # slot -> expert
        self.free = list(reversed(slots))

    def waves(self, routed: list[int], size: int | None = None) -> list[list[int]]:
        """The distinct experts of one step's routed ids, most-routed first and resident ones before
        missing ones (stable), cut into groups of `size` (default: this layer's slots; long prefills
        need several)."""
        needed = [e for e, _ in Counter(routed).most_common()]
        needed.sort(key=lambda e: e not in self.slot_of)
        quota = size or len(self.slots)
        return [needed[start : start + quota] for start in range(0, len(needed), quota)]

    def schedule(self, routed: list[int]) -> list[list[int]]:
        """The waves one step's routed ids run in: one when their experts fit the slots, else waves of half
        the slots, so that one half computes while the next wave's copies fill the other."""
        waves = self.waves(routed)
        if len(waves) > 1 and len(self.slots) >= 2:
            waves = self.waves(routed, len(self.slots) // 2)
        return waves

    def admit(
        self, waves: list[list[int]], on_hit: Callable[[int], None], load: Callable[[int, set[int]], int]
    ) -> Iterator[dict[int, int]]:
        """Each wave's expert -> slot (ensure), in the order the store issues them: where two waves fit the
        slots, wave i + 1 is admitted before wave i is yielded (its copies run while wave i computes), into
        slots outside wave i's; else one wave after the other."""
        if not waves:  # every routed expert computed elsewhere (the CPU)
            return
        if 2 * max(map(len, waves)) > len(self.slots):
            for group in waves:
                yield self.ensure(group, on_hit, load)
            return
        upcoming = self.ensure(waves[0], on_hit, load)
        for i in range(len(waves)):
            current = upcoming
            if i + 1 < len(waves):
                busy = set(current.values())
                upcoming = self.ensure(
                    waves[i + 1], on_hit, lambda e, exclude, busy=busy: load(e, exclude | busy)
                )
            yield current

    def ensure(
        self, group: list[int], on_hit: Callable[[int], None], load: Callable[[int, set[int]], int]
    ) -> dict[int, int]:
        """expert -> slot for every expert of `group`: a resident one is touched (after on_hit(slot)); a
        missing one gets the slot load(expert, exclude) returns, never one the group already holds."""
        slot_of = {e: self.slot_of[e] for e in group if e in self.slot_of}
        for slot in slot_of.values():
            on_hit(slot)
            self.policy.touch(slot)
        exclude = set(slot_of.values())
        for e in group:
            if e not in slot_of:
                slot_of[e] = load(e, exclude)
                exclude.add(slot_of[e])
        return slot_of

    def claim(self, expert: int, exclude: set[int], prefetched: bool) -> int:
        """A slot for `expert`, evicting the policy's victim (never one in `exclude`) when full."""
        slot = self.free[-1] if self.free else self.policy.victim(exclude)
        self.put(expert, slot, prefetched)
        return slot

    def evict(self, slot: int) -> int | None:
        """Empty `slot` (back to the free slots); its expert, if it held one."""
        evicted = self.expert_of.pop(slot, None)
        if evicted is not None:
            del self.slot_of[evicted]
            self.free.append(slot)
        return evicted

    def put(self, expert: int, slot: int, prefetched: bool = False) -> int | None:
        """`expert` into `slot` (free, or its expert evicted: returned)."""
        evicted = self.expert_of.pop(slot, None)
        if evicted is None:
            self.free.remove(slot)
        else:
            del self.slot_of[evicted]
        self.slot_of[expert] = slot
        self.expert_of[slot] = expert
        self.policy.insert(slot, prefetched)
        return evicted


class SlotPool:
    def __init__(
        self,
        quotas: dict[int, int],
        fmt: ExpertFormat,
        device: torch.device,
        policy: str,
    ):
        total = sum(quotas.values())
        self.flat = fmt.empty(total, device)  # uint8 [slots, expert bytes]
        self.bank = fmt.views(self.flat)
        self.layers: dict[int, LayerSlots] = {}
        start = 0
        for layer, quota in quotas.items():
            self.layers[layer] = LayerSlots(range(start, start + quota), policy)
            start += quota
        self.ready: list = [None] * total  # event: the copy into the slot finished
        self.released: list = [None] * total  # event: the last kernel reading the slot finished
        self.prefetched = [False] * total  # filled by a prefetch and not used since

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def __len__(self) -> int:
        return self.flat.shape[0]
