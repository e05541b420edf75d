"""Decode with no host round trip per layer: missing experts read in place from pinned host memory.

A device table holds, per MoE layer and expert, the address the decode kernels read the expert at: its
GPU slot once admitted there, else its copy in the pinned host cache, which the kernel reads over PCIe
(zero-copy). A layer's step is then one kernel launch over the table, with no decision on the host, so
the whole decode step is one CUDA graph. Each step writes its routed ids to a device buffer; after the
step (the engine has its tokens, so the GPU is done) the host reads them and counts hits and misses.

Two ways to read a miss, one per miss path: in-place, the expert kernels read it over PCIe themselves;
staged, a wide copy kernel first stages the layer's missed experts into HBM (the same zero-copy reads,
but as many of them in flight as the bus takes) and the kernels read every pair from HBM. The GEMV's own
reads of host memory were measured at 16 GB/s against the bus's 50. Which is faster depends on the hit
rate each keeps, not only on one layer's kernels (bench/NOTES.md 43): the planner simulates both.

Staged, the copy is the admission: each missed expert is copied into a victim slot of its layer, chosen
on the GPU from a list the host gives (the policy's next victims, a slot the step routes skipped), the
table flipped in the same step; after the step the host reads the slots' owners back and follows.
Every miss is admitted, as on the copy path, and crosses PCIe once (a list too short for the step's
misses stages the rest into a buffer, for that step only).

Read in place, a miss is admitted only when it was routed more often lately than the expert the slot
policy would evict (TinyLFU's admission test): admitting every miss would move each missed expert over
PCIe twice, once read in place and once copied, for experts that may not come back. A victim's entry goes
back to its host copy before the copy into its slot starts; an admitted expert's entry points at its
slot only once its copy has landed, seen at a later step: admission lags the routing by at least one
step.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..formats.swiglu import GATHER_MAX_PAIRS
from .gpu_pool import LayerSlots
from .policy import RoutedCounts

# Victims listed for a staged step, per layer: its distinct misses, plus as many listed slots its routed
# experts hold (skipped), at most.
CANDIDATES = 2 * GATHER_MAX_PAIRS


def staging_bytes(plan) -> int:
    """The staged path's buffer (a graph-safe step's misses), out of a MemoryPlan's workspace reserve."""
    return GATHER_MAX_PAIRS * plan.expert_bytes


def staging_fits(plan) -> bool:
    return staging_bytes(plan) <= plan.workspace_bytes


def refusal(path: str, fmt, device: torch.device, plan, num_experts: int) -> str | None:
    """Why miss_path `path` (in-place or staged) cannot run for these experts, this device and this
    MemoryPlan (its host_slots are the host cache's capacity), or None where it can: the one test the
    store's refusal and `--miss-path auto`'s choice share."""
    if not fmt.kernels:
        return f"miss_path {path} needs a decode kernel for {fmt.name} experts"
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        return f"miss_path {path} needs a CUDA GPU"
    total = len(plan.quotas) * num_experts
    if plan.host_slots < total:
        return (
            f"miss_path {path} reads missed experts from host memory, so all {total} must fit the host "
            f"cache ({plan.host_slots} do): raise --cpu-budget to {total * fmt.nbytes / 2**30:.1f} GiB or use "
            "miss_path copy"
        )
    # Off the GPU (Triton's interpreter, the tests) host memory is not the plan's to budget.
    if path == "staged" and device.type == "cuda" and not staging_fits(plan):
        return (
            f"miss_path staged stages a step's misses in the workspace reserve: raise --workspace to "
            f"{staging_bytes(plan) / 2**30:.2f} GiB (it is {plan.workspace_bytes / 2**30:.2f}) or use in-place"
        )
    return None


def admits(freq: np.ndarray, e: int, part: LayerSlots, exclude: set[int]) -> bool:
    """Whether missed expert e earns a slot of its layer (freq: the layer's recent routing counts per
    expert): a free one, or e routed more often lately than the expert the policy would evict for it."""
    if part.free:
        return True
    if len(exclude) >= len(part.slots):
        return False
    victim = part.expert_of[part.policy.victim(exclude)]
    return freq[e] > freq[victim]


class InPlaceMisses:
    """The in-place decode path of a TieredExpertStore: table int64 [MoE layers, experts] of addresses
    on the device, routed int64 [MoE layers, most pairs a graph-safe step has] of the last step's ids."""

    def __init__(self, store, top_k: int, staged: bool = False):
        self.store, self.top_k = store, top_k
        fmt, host, plan = store.format, store.host, store.plan
        path = "staged" if staged else "in-place"
        if reason := refusal(path, fmt, store.device, plan, store.num_experts):
            raise InvalidRequestError(reason, "miss_path")
        layers = list(plan.quotas)
        self.row = {layer: r for r, layer in enumerate(layers)}
        # Every expert is in the host cache (the store preloads a cache that holds them all) and stays.
        self.host_addr = torch.tensor(
            [
                [host.buffer(host.get(layer, e)[0]).data_ptr() for e in range(store.num_experts)]
                for layer in layers
            ],
            dtype=torch.int64,
        )  # [L, E]
        self.table = self.host_addr.to(store.device, copy=True)  # a copy even on the CPU: entries change
        pool = store.pool
        self.slot_addr = [pool.flat[s].data_ptr() for s in range(len(pool))]
        # Staged admission's state on the GPU: each expert's host address (an evicted entry's way back),
        # the expert each slot holds (-1: free), each layer's next victims (the host's copy in `listed`).
        self.host_table = self.host_addr.to(store.device)
        self.owner = torch.full((len(pool),), -1, dtype=torch.long, device=store.device)
        self.owner_seen = np.full(len(pool), -1, dtype=np.int64)  # `owner` as the host last knew it
        self.listed = np.full((len(layers), CANDIDATES), -1, dtype=np.int64)
        self.candidates = torch.from_numpy(self.listed).to(store.device, copy=True)
        self.resident: dict[int, set[int]] = {layer: set() for layer in layers}  # entry points at the slot
        self.unsettled = False  # a staged forward may have admitted experts the host has not taken in
        self.pending: list[tuple[int, int, int, object]] = []  # (layer, expert, slot, copy event)
        self.routed = torch.zeros(len(layers), GATHER_MAX_PAIRS, dtype=torch.long, device=store.device)
        self.recent = RoutedCounts(layers, store.num_experts)  # the admission test's counts
        # Staged, a graph-safe step's missed experts land here when no listed victim takes them: out of
        # the plan's workspace reserve.
        self.pair_ids = torch.arange(GATHER_MAX_PAIRS, device=store.device)  # pair p reads address p
        self.staging = fmt.empty(GATHER_MAX_PAIRS, store.device) if staged else None
        if staged:  # the free slots are the first step's victims (a short first prompt stages its prefill)
            self._list_victims(self.row)

    @property
    def staged(self) -> bool:
        return self.staging is not None

    def graph_safe(self, tokens: int) -> bool:
        # The GEMV over an address table (and the staging buffer) take a decode step's few pairs.
        return tokens * self.top_k <= GATHER_MAX_PAIRS

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from ..formats import triton_kernels  # triton decides compiled or interpreted at first import

        row = self.row[layer]
        table = self.table[row]
        if self.staged:  # [P] addresses; admitting, the table row and the owners change in place
            admit = (self.host_table[row], self.candidates[row], self.owner)
            table = triton_kernels.stage(
                table, ids, self.store.pool.flat, self.staging, admit, self.routed[row]
            )
            ids = self.pair_ids[: ids.numel()].view(ids.shape)
            self.unsettled = True
        else:
            self.routed[row, : ids.numel()].copy_(ids.reshape(-1))
        return triton_kernels.mlp_at(self.store.format, x, ids, weights, table)

    def settle(self) -> None:
        """Take in what staged forwards admitted on the GPU since the last settle (any forward of few
        pairs: decode steps, graph replays included, and short prompt chunks), before the host reads its
        slots again: the owners of the listed slots (the only ones the GPU writes) read back; every changed
        slot's old expert out first, then the new ones in (two forwards may have moved an expert from one
        listed slot to another); the next victims listed."""
        if not self.unsettled:
            return
        self.unsettled = False
        owner, pool = self.owner.cpu().numpy(), self.store.pool
        # The slots the GPU wrote since: listed ones whose owner moved from what the host last knew (a
        # vector test over every layer at once; the host's slots agree with owner_seen between settles).
        at = self.listed.clip(min=0)
        moved = (self.listed >= 0) & (owner[at] != self.owner_seen[at])
        self.owner_seen[:] = owner
        layers = list(self.row)
        for r in np.flatnonzero(moved.any(axis=1)).tolist():
            layer = layers[r]
            part, resident = pool.layers[layer], self.resident[layer]
            changed = [s for s in self.listed[r][moved[r]].tolist() if owner[s] != part.expert_of.get(s, -1)]
            for slot in changed:
                resident.discard(part.evict(slot))
            for slot in changed:
                expert = int(owner[slot])
                part.put(expert, slot)
                resident.add(expert)
                pool.prefetched[slot] = False
        self._list_victims(self.row)

    def sync_layer(self, layer: int) -> None:
        """After the copy path ran `layer` (a prefill; staged admissions settled before it): its slots hold
        what the policy put there, so each resident expert's entry points at its slot, read once its copy
        has landed."""
        store = self.store
        part = store.pool.layers[layer]
        # Every slot's copy (the prefill's, a prefetch's, an admission still pending) lands before any
        # later kernel reads the table.
        store._wait(part.slot_of.values())
        self.pending = [p for p in self.pending if p[0] != layer]
        self.resident[layer] = set(part.slot_of)
        row = self.host_addr[self.row[layer]].clone()
        for e, slot in part.slot_of.items():
            row[e] = self.slot_addr[slot]
        self.table[self.row[layer]].copy_(store.copier.to_device(row, store.device))
        self._follow_slots([layer])

    def _follow_slots(self, layers) -> None:
        """The GPU's slot owners and listed victims of `layers` from the host's view (staged admission
        keeps them; the copy path and admission by copies do not)."""
        for layer in layers:
            part = self.store.pool.layers[layer]
            owner = torch.tensor([part.expert_of.get(slot, -1) for slot in part.slots], dtype=torch.long)
            self.owner[part.slots.start : part.slots.stop].copy_(
                self.store.copier.to_device(owner, self.store.device)
            )
            self.owner_seen[part.slots.start : part.slots.stop] = owner.numpy()
        self._list_victims(layers)

    def _list_victims(self, layers) -> None:
        """Each of `layers`' next victims for a staged step, in the order the layer would pick them: its
        free slots as claim takes them, then the policy's."""
        for layer in layers:
            part, r = self.store.pool.layers[layer], self.row[layer]
            listed = part.free[::-1][:CANDIDATES]
            listed += part.policy.victims(CANDIDATES - len(listed))
            self.listed[r] = -1
            self.listed[r, : len(listed)] = listed
        self.candidates.copy_(self.store.copier.to_device(torch.from_numpy(self.listed), self.store.device))

    def after_step(self, tokens: int) -> None:
        """Count the step's hits and misses, flip the entries of admissions that landed, admit the step's
        misses (victims' entries back to host memory first, then their copies, on the side stream)."""
        store, pairs = self.store, tokens * self.top_k
        if not self.graph_safe(tokens):
            return  # that step ran the copy path
        ids = self.routed[:, :pairs]
        routed = ids.cpu().numpy()  # the step is done: no wait
        self.recent.add_step(routed)
        routed = routed.tolist()
        stats = store.stats_
        for layer, r in self.row.items():  # counted against the table the step read
            if self.staged:  # each missed expert copied once
                distinct = set(routed[r])
                hits = len(distinct & self.resident[layer])
                stats.gpu_hits += hits
                stats.gpu_misses += len(distinct) - hits
                stats.bytes_in_place += (len(distinct) - hits) * store.expert_bytes
                continue
            for e, n in Counter(routed[r]).items():
                if e in self.resident[layer]:
                    stats.gpu_hits += 1
                else:
                    stats.gpu_misses += 1
                    stats.bytes_in_place += n * store.expert_bytes  # each pair's program reads it
        if self.staged:  # its hits used, then its admissions (the copy path's order; a graph replay
            # never calls forward, so they are taken in here whatever the flag says)
            for layer, r in self.row.items():
                part = store.pool.layers[layer]
                for e in dict.fromkeys(routed[r]):
                    if e in self.resident[layer]:
                        part.policy.touch(part.slot_of[e])
            self.unsettled = True
            self.settle()
            return
        flips: dict[tuple[int, int], int] = {}
        waiting = []
        for layer, e, slot, event in self.pending:
            if store.pool.layers[layer].expert_of.get(slot) != e:
                continue  # evicted again before it landed
            if event is None or event.query():
                flips[(self.row[layer], e)] = self.slot_addr[slot]
                self.resident[layer].add(e)
            else:
                waiting.append((layer, e, slot, event))
        self.pending = waiting
        admitted = []
        for layer, r in self.row.items():
            part = store.pool.layers[layer]
            group = part.waves(routed[r])[0]  # the slots' share of this step's experts
            exclude = {part.slot_of[e] for e in group if e in part.slot_of}
            for slot in exclude:
                part.policy.touch(slot)
            for e in group:
                if e not in part.slot_of and admits(self.recent.freq[r], e, part, exclude):
                    exclude.add(self._claim(layer, e, part, exclude, flips, admitted))
        if flips:
            index = torch.tensor(list(flips), dtype=torch.long)
            self.table[index[:, 0], index[:, 1]] = torch.tensor(list(flips.values()), dtype=torch.int64).to(
                store.device
            )
        after = store.copier.mark_used()  # the flips, and every kernel of the step, come before the copies
        for layer, e, slot in admitted:
            # Its ready event too: a later prefill on the copy path waits for it before reading the slot.
            event = store.copy_in(store.host.get(layer, e)[0], slot, after=after)
            self.pending.append((layer, e, slot, event))

    def _claim(
        self, layer: int, e: int, part: LayerSlots, exclude: set[int], flips: dict, admitted: list
    ) -> int:
        """A slot for missed expert e: its victim's entry goes back to the host copy now."""
        victim = None if part.free else part.expert_of[part.policy.victim(exclude)]  # claim's own choice
        slot = part.claim(e, exclude, prefetched=False)
        if victim is not None:
            self.resident[layer].discard(victim)
            flips[(self.row[layer], victim)] = int(self.host_addr[self.row[layer], victim])
            self.pending = [p for p in self.pending if p[2] != slot]
        admitted.append((layer, e, slot))
        return slot
