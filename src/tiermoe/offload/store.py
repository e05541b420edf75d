"""TieredExpertStore: the ExpertProvider that runs a model whose experts do not fit on the GPU.

Per MoE layer and step (the copy path; miss_path in-place decodes as offload/in_place.py says): route
(done by the block), pull the routed expert ids to the host together with the next layer's predicted
ids (one synchronisation), load missing experts into this layer's GPU slots from the host cache (which
reads the disk on its own misses), launch the expert kernels behind those copies (the compute stream
waits for their events; the host never does), then start copying the next layer's predicted experts on
the side stream while the kernels run. With CPU compute on, part of a decode layer's misses are computed
on the CPU from the host cache while the copies and the kernels run (offload/cpu_compute.py), and only
the tokens' hidden states cross the bus. A layer that hits more
experts than it has slots (long prefills) runs in waves of half its slots, each wave's copies issued
while the one before computes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, fields

import torch

from ..formats.base import ExpertFormat
from ..formats.swiglu import GATHER_MAX_PAIRS, skip_served
from . import cpu_compute
from .budget import MemoryPlan
from .cpu_compute import MissCosts
from .gpu_pool import LayerSlots, SlotPool
from .host_cache import HostCache
from .in_place import InPlaceMisses
from .policy import RoutedCounts
from .predictor import Predictor
from .sources import ExpertSource
from .transfer import CopyStream


@dataclass
class StoreStats:
    gpu_hits: int = 0  # routed expert already in a slot, not brought by a prefetch
    prefetch_hits: int = 0  # routed expert in a slot because a prefetch brought it
    gpu_misses: int = 0  # routed expert loaded on demand (streamed)
    cpu_computed: int = 0  # routed expert missing from the GPU, computed on the CPU from the host cache
    prefetch_issued: int = 0
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    predicted: int = 0  # experts the predictor named for a layer
    predicted_correct: int = 0  # of those, how many the layer routed to
    routed: int = 0  # unique experts the layers routed to (for prediction recall)
    host_hits: int = 0
    host_misses: int = 0  # read from the expert source (disk)
    bytes_h2d: int = 0  # copied into slots
    bytes_in_place: int = 0  # read by kernels from pinned host memory (in-place, staged), also over PCIe
    bytes_disk: int = 0
    disk_s: float = 0.0
    cpu_s: float = 0.0  # host time computing experts on the CPU

    def minus(self, earlier: dict) -> StoreStats:
        """The counts since `earlier` (an earlier to_dict() of these statistics)."""
        return StoreStats(**{f.name: getattr(self, f.name) - earlier[f.name] for f in fields(self)})

    @classmethod
    def of(cls, stats: dict) -> StoreStats:
        """The counts of a provider's stats() (all zero for one without a store: an empty dict)."""
        return cls(**{f.name: stats.get(f.name, 0) for f in fields(cls)})

    def plus(self, other: StoreStats, share: float = 1.0) -> StoreStats:
        """These counts and `share` of other's (a step's counts, split among the sequences it ran)."""
        return StoreStats(
            **{f.name: getattr(self, f.name) + share * getattr(other, f.name) for f in fields(self)}
        )

    def to_dict(self) -> dict:
        # Shares of steps make counts fractional; a whole one reads as an integer (after rounding, so a sum
        # of shares such as 2.9999999999999996 does too).
        d = {}
        for k, v in asdict(self).items():
            r = round(v, 6) + 0.0  # + 0.0: no -0.0
            d[k] = int(r) if r.is_integer() and k not in _SECONDS else r
        served = self.gpu_hits + self.prefetch_hits + self.gpu_misses + self.cpu_computed
        d["gpu_hit_rate"] = round((self.gpu_hits + self.prefetch_hits) / served, 4) if served else None
        d["prefetch_precision"] = (
            round(self.predicted_correct / self.predicted, 4) if self.predicted else None
        )
        d["prefetch_recall"] = round(self.predicted_correct / self.routed, 4) if self.routed else None
        host = self.host_hits + self.host_misses
        d["host_hit_rate"] = round(self.host_hits / host, 4) if host else None
        return d


_SECONDS = {"disk_s", "cpu_s"}


class TieredExpertStore:
    def __init__(
        self,
        source: ExpertSource,
        plan: MemoryPlan,
        fmt: ExpertFormat,
        num_experts: int,
        device: torch.device,
        policy: str = "lru",
        prefetch: bool = True,
        progress=None,
        miss_path: str = "copy",
        top_k: int = 1,
        cpu_costs: MissCosts | None = None,
    ):
        """cpu_costs: compute misses on the CPU where these costs say it is faster (None: never); see
        `measure_cpu_costs`."""
        self.plan, self.device, self.prefetch = plan, device, prefetch
        self.num_experts = num_experts
        if plan.expert_bytes != fmt.nbytes:
            raise ValueError(
                f"the plan counts {plan.expert_bytes} bytes an expert, {fmt.name} has {fmt.nbytes}"
            )
        self.expert_bytes, self.format = fmt.nbytes, fmt
        self.host = HostCache(source, plan.host_slots, fmt, pinned=device.type == "cuda")
        self.pool = SlotPool(plan.quotas, fmt, device, policy)
        self.copier = CopyStream(device)
        self.predictor: Predictor | None = None
        self.policy = policy
        self._predicted: dict[int, set[int]] = {}
        self._preload(list(plan.quotas), progress)
        self.stats_ = StoreStats()
        self._host_counts = (self.host.source_reads, self.host.wait_s)  # counted into stats_ so far
        self.miss_path = miss_path
        self.in_place = InPlaceMisses(self, top_k, miss_path == "staged") if miss_path != "copy" else None
        self.cpu_costs = cpu_costs
        self.recent = RoutedCounts(list(plan.quotas), num_experts)  # the CPU split's ranking

    def measure_cpu_costs(self, dtype: torch.dtype) -> MissCosts:
        """This machine's MissCosts for this store's experts, timed with the host cache's first experts
        (enough of them to come from DRAM, as in decode) and a scratch slot (hidden states in dtype)."""
        entries = list(self.host.entry_of.values())
        entries = entries[: cpu_compute.timing_experts(self.expert_bytes, len(entries))]
        return cpu_compute.measure(
            self.format, [self.host.buffer(e) for e in entries], self.format.empty(1, self.device)[0], dtype
        )

    def _preload(self, layers: list[int], progress) -> None:
        """Fill the host cache in layer order, so a cache that holds everything never reads the disk again."""
        count = min(self.host.capacity, len(layers) * self.num_experts)
        task = progress.add_task("experts to host", total=count) if progress else None
        keys = [(layer, e) for layer in layers for e in range(self.num_experts)][:count]
        self.host.read_ahead(keys)  # every read queued: the reader threads keep the disk busy
        for layer, e in keys:
            self.host.get(layer, e)
            if progress:
                progress.advance(task)

    def attach(self, predictor: Predictor) -> None:
        # The prediction serves the GPU prefetch when asked for, and the host cache's read-ahead from
        # disk whenever the host cache cannot hold every expert.
        if self.prefetch or self.host.capacity < len(self.plan.quotas) * self.num_experts:
            self.predictor = predictor

    def graph_safe(self, tokens: int) -> bool:
        # The copy path pulls every layer's routed ids to the host; the in-place path never does.
        return self.in_place is not None and self.in_place.graph_safe(tokens)

    def after_step(self, tokens: int) -> None:
        if self.in_place is not None:
            self.in_place.after_step(tokens)

    def stats(self, since: dict | None = None) -> dict:
        self._count_reads()
        d = (self.stats_ if since is None else self.stats_.minus(since)).to_dict()
        d.update(
            format=self.format.describe(),
            policy=self.policy,
            prefetch=self.prefetch,
            miss_path=self.miss_path,
            cpu_compute=self.cpu_costs is not None,
            gpu_slots=len(self.pool),
            # fewer than top-k: a decode token's misses take several waves a layer (bench/NOTES.md 37)
            layer_slots_min=min(len(part.slots) for part in self.pool.layers.values()),
            host_slots=self.host.capacity,
            source=self.host.source.description,
        )
        return d

    def _count_reads(self) -> None:
        """The host cache's reads from the source since the last count (read-aheads included)."""
        reads, wait_s = self.host.source_reads, self.host.wait_s
        s = self.stats_
        s.host_misses += reads - self._host_counts[0]
        s.bytes_disk += (reads - self._host_counts[0]) * self.expert_bytes
        s.disk_s += wait_s - self._host_counts[1]
        self._host_counts = (reads, wait_s)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.in_place is not None:
            if self.in_place.graph_safe(x.shape[0]):
                return self.in_place.forward(layer, x, ids, weights)
            self.in_place.settle()  # the copy path reads the slots as the GPU left them
            out = self._copy_path(layer, x, ids, weights)
            self.in_place.sync_layer(layer)
            return out
        return self._copy_path(layer, x, ids, weights)

    def _copy_path(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        prediction = self.predictor.predict(layer, x) if self.predictor else None
        flat = ids.reshape(-1)
        # No host sync in the waves (each runs every pair, the others' skipped) where the format's mlp has
        # none at this many pairs; the CPU share and the look-ahead only for a step of few pairs (one or two
        # sequences' decode: a prefill's predictions name most experts).
        no_sync = self.format.graph_safe(flat.numel(), self.device)
        decode = flat.numel() <= GATHER_MAX_PAIRS
        cpu = self.cpu_costs is not None and decode
        if cpu:  # the hidden states and routing weights land on the host with the ids' sync below
            x_host, w_host = (t.to("cpu", non_blocking=True) for t in (x, weights))
        if prediction is not None:
            both = torch.cat([flat, prediction[1].reshape(-1)]).tolist()  # one sync for both
            routed, predicted = both[: flat.numel()], both[flat.numel() :]
        else:
            routed, predicted = flat.tolist(), []
        part = self.pool.layers[layer]
        on_cpu = self._cpu_share(layer, routed, part) if cpu else {}
        waves = part.schedule([e for e in routed if e not in on_cpu])
        needed = [e for group in waves for e in group]
        self._score(layer, needed + list(on_cpu))
        # This layer's experts missing from the host cache read from disk at once, not one by one.
        self.host.read_ahead([(layer, e) for e in needed if e not in part.slot_of])
        out = cpu_out = pairs = None
        if on_cpu and not waves:
            cpu_out = self._compute_on_cpu(on_cpu, routed, x_host, w_host)
        if prediction is not None and not waves:  # every expert on the CPU: no wave to follow
            self._look_ahead(prediction[0], predicted, len(needed), decode)
        admitted = part.admit(waves, self._hit, lambda e, exclude: self._demand(layer, e, part, exclude))
        split = len(waves) > 1 or bool(on_cpu)  # a wave holds some of the step's pairs, not all
        for i, slot_of in enumerate(admitted):
            # The kernels wait for this wave's copies on the GPU; the host goes on (and computes the CPU's
            # share below while the copies and the kernels run).
            self._wait(slot_of.values())
            # Each pair's slot in this wave, [T, k]; -1: another wave's, or the CPU's. A decode step's few
            # pairs from the host's lists (a quarter off the store's host time a layer, and no gather
            # launch); many pairs in many waves by a table over the experts, gathered on the device (the
            # host's lists took 1.8x the time at 64 sequences' 512 pairs: bench/NOTES.md section 39).
            if decode:
                wave = torch.tensor([slot_of.get(e, -1) for e in routed], dtype=torch.long).view(ids.shape)
                slots = self.copier.to_device(wave, self.device)
            else:
                lut = torch.full((self.num_experts,), -1, dtype=torch.long)
                lut[list(slot_of)] = torch.tensor(list(slot_of.values()))
                slots = self.copier.to_device(lut, self.device)[ids]
            if split and (y := self.format.mlp_pairs(x, slots, weights, self.pool.bank)) is not None:
                # Each wave's pairs apart (the others' 0), summed once at the end: the bits of one mlp.
                pairs = y if pairs is None else pairs.add_(y)
            elif len(waves) == 1 or no_sync:
                # The pairs of other waves and the CPU's go in too, skipped: no host sync to pick this wave's
                # pairs out (a few pairs' paths read every pair's slot: a slot of this wave, weight 0).
                wave_slots, wave_weights = slots, weights
                if split and decode:
                    wave_slots, wave_weights = skip_served(slots, weights)
                y = self.format.mlp(x, wave_slots, wave_weights, self.pool.bank)
                out = y if out is None else out.add_(y)
            else:
                out = torch.zeros_like(x) if out is None else out
                tok, k = (slots >= 0).nonzero(as_tuple=True)
                self.format.accumulate(x, tok, slots[tok, k], weights[tok, k], self.pool.bank, out)
            used = self.copier.mark_used()
            for slot in slot_of.values():
                self.pool.released[slot] = used
            # The CPU share before the look-ahead: a prefetch may read the disk, or evict the host-cache
            # entries the CPU share reads.
            if i == 0 and on_cpu:
                cpu_out = self._compute_on_cpu(on_cpu, routed, x_host, w_host)
            if i == 0 and prediction is not None:
                self._look_ahead(prediction[0], predicted, len(needed), decode)
        if pairs is not None:
            out = pairs.sum(dim=1).to(x.dtype)
        if cpu_out is not None:
            cpu_out = self.copier.to_device(cpu_out, self.device)
            out = cpu_out if out is None else out.add_(cpu_out)
        return out

    def _look_ahead(self, layer: int, predicted: list[int], routed: int, decode: bool) -> None:
        """Act on the next layer's predicted experts: copy them to GPU slots (prefetch on), else, in
        decode, start reading from disk those neither on the GPU nor in the host cache (a prefill's
        predictions name most experts: reading them all would churn the host cache)."""
        if self.prefetch:
            self._prefetch(layer, predicted, routed)
        elif decode:
            resident = self.pool.layers[layer].slot_of
            self.host.read_ahead([(layer, e) for e in dict.fromkeys(predicted) if e not in resident])

    def _cpu_share(self, layer: int, routed: list[int], part: LayerSlots) -> dict[int, torch.Tensor]:
        """The misses of this step's routed ids that the CPU computes faster, by cost (expert -> its
        host cache bytes); only experts already in the host cache."""
        on_cpu = cpu_compute.choose(
            routed,
            part.slot_of,
            self.cpu_costs,
            lambda e: self.host.holds(layer, e),
            self.recent.of(layer),
        )
        self.recent.add(layer, routed)
        self.stats_.cpu_computed += len(on_cpu)
        self.stats_.host_hits += len(on_cpu)
        return {e: self.host.buffer(self.host.get(layer, e)[0]) for e in on_cpu}

    def _compute_on_cpu(self, experts: dict, routed: list[int], x: torch.Tensor, weights: torch.Tensor):
        k = len(routed) // x.shape[0]
        w = weights.reshape(-1).tolist()
        pairs: dict[int, tuple[list[int], list[float]]] = {e: ([], []) for e in experts}
        for j, e in enumerate(routed):
            if e in experts:
                pairs[e][0].append(j // k)
                pairs[e][1].append(w[j])
        start = time.perf_counter()
        out = cpu_compute.compute(self.format, x, pairs, experts)
        self.stats_.cpu_s += time.perf_counter() - start
        return out

    def _score(self, layer: int, needed: list[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            s = self.stats_
            s.predicted += len(predicted)
            s.predicted_correct += len(predicted.intersection(needed))
            s.routed += len(needed)

    def _hit(self, slot: int) -> None:
        if self.pool.prefetched[slot]:
            self.stats_.prefetch_hits += 1
            self.pool.prefetched[slot] = False
        else:
            self.stats_.gpu_hits += 1

    def _demand(self, layer: int, expert: int, part: LayerSlots, exclude: set[int]) -> int:
        self.stats_.gpu_misses += 1
        return self._load(layer, expert, part, exclude, prefetched=False)

    def _load(self, layer: int, expert: int, part: LayerSlots, exclude: set[int], prefetched: bool) -> int:
        s = self.stats_
        # Read first: should the read fail, no slot has been handed to an expert it does not hold.
        entry, hit = self.host.get(layer, expert)
        s.host_hits += hit  # reads from the source are counted from the host cache (_count_reads)
        slot = part.claim(expert, exclude, prefetched)
        if self.pool.prefetched[slot]:  # the victim was prefetched and never used
            s.prefetch_wasted += 1
        self.copy_in(entry, slot, after=self.pool.released[slot])
        self.pool.prefetched[slot] = prefetched
        return slot

    def copy_in(self, entry: int, slot: int, after) -> object:
        """Copy host cache entry into GPU slot on the side stream once `after` (an event) has passed;
        the slot's ready event, which any kernel reading the slot waits for, is the copy's."""
        event = self.copier.copy(self.pool.flat[slot], self.host.buffer(entry), after=after)
        self.host.reading(entry, event)
        self.pool.ready[slot] = event
        self.stats_.bytes_h2d += self.expert_bytes
        return event

    def _prefetch(self, layer: int, predicted: list[int], routed: int) -> None:
        """Copy the predicted experts of `layer` that are not resident, at most as many as the layer has
        slots beyond one step's working set: at tighter budgets a wrong guess would evict experts the next
        token needs (measured on OLMoE at 4 GiB, 8.5 slots per layer: hit rate 94% without prefetch,
        75% with unlimited prefetch)."""
        part = self.pool.layers[layer]
        ranked = [e for e, _ in Counter(predicted).most_common()]
        self._predicted[layer] = set(ranked)
        exclude = {part.slot_of[e] for e in ranked if e in part.slot_of}
        # Never more than the slots beyond the working set, nor than those not holding a predicted expert:
        # each copy takes one of those, and with none left there is no victim.
        room = min(len(part.slots) - routed, len(part.slots) - len(exclude))
        missing = [e for e in ranked if e not in part.slot_of][: max(room, 0)]
        self.host.read_ahead([(layer, e) for e in missing])
        for e in missing:
            exclude.add(self._load(layer, e, part, exclude, prefetched=True))
            self.stats_.prefetch_issued += 1

    def _wait(self, slots) -> None:
        for slot in slots:
            self.copier.wait(self.pool.ready[slot])
            self.pool.ready[slot] = None
