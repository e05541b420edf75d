"""The planner: the layout that decodes fastest within the budgets, chosen by simulating candidates.

A layout is the store's settings that change speed but not output (eviction policy, miss path, CPU
compute of misses) and the KV reserve (which trades context for expert slots). Each candidate is
replayed over a routing trace through the engine's own decisions (`LayerSlots` admission, the CPU split
of `cpu_compute.choose`, the in-place path's admission test), which gives its hits, streamed, CPU-computed
and in-place experts per step; this machine's measured costs turn those into seconds:

    step = step_s + per MoE layer: copy path   layer_s + max(streamed x stream_s, CPU share)
                                   in-place    pairs read in place x in_place_s (+ admissions x stream_s)
                                     staged    misses x in_place_s (each admitted by its staging copy)

`step_s` (dense layers, the experts' compute, sampling) and `layer_s` (the copy path's host round trip
per layer) come from a calibration run: the engine decodes a short szd workload at the default layout
with its routing recorded, and the measured step time less the simulated traffic of that very trace
fixes step_s. Without one (`tiermoe plan --no-calibrate`: no model load) the trace is the routing model's
own (szd, `routing/synthetic.synthetic_trace`) and step_s an estimate (the dense weights read once at
HBM speed), so only the candidates' order is to be trusted, not their tok/s; the prediction says so.

Where the host cache holds fewer experts than the model has, the simulation keeps it too (LRU over all
layers, a step's held experts touched before its misses are read, as the engine's read-ahead does) and
charges each read from disk `disk_s`. The engine also reads the next layer's predicted experts ahead,
which the simulation does not, so its disk-tier predictions err on the slow side.

Presets: latency, the fastest at batch 1; throughput, the largest KV reserve (tokens a batch can hold)
within 10 % of the fastest; balanced, within 5 %; auto, throughput for the server and latency otherwise.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, replace

from .formats.swiglu import GATHER_MAX_PAIRS
from .offload import cpu_compute
from .offload.cpu_compute import MissCosts
from .offload.gpu_pool import LayerSlots
from .offload.in_place import admits
from .offload.policy import RoutedCounts
from .routing.replay import admissions
from .routing.trace import Trace

PRESET_SLACK = {"latency": 0.0, "balanced": 0.05, "throughput": 0.10}  # tok/s given up for KV tokens


@dataclass(frozen=True)
class Layout:
    eviction: str = "lfu"
    miss_path: str = "copy"
    cpu_compute: bool = False
    kv_reserve_tokens: int | None = None  # None: the engine's default

    @property
    def name(self) -> str:
        kv = f" kv {self.kv_reserve_tokens}" if self.kv_reserve_tokens else ""
        return f"{self.eviction} {self.miss_path}{' +cpu' if self.cpu_compute else ''}{kv}"

    def options(self) -> dict:
        """LLM keywords of this layout (prefetch off: the simulation has no predictor, and szd routing
        measured it no better, bench/NOTES.md)."""
        return {**asdict(self), "prefetch": False}

    @staticmethod
    def options_of(candidate: dict) -> dict:
        """The LLM keywords of a saved plan's candidate (Prediction.to_dict)."""
        return {k: candidate[k] for k in Layout().options()}


@dataclass(frozen=True)
class Costs:
    """Seconds a decode step spends, measured on this machine for one model and expert format."""

    stream_s: float  # one expert copied into a GPU slot
    in_place_s: float | None  # one (token, expert) pair's expert read in place by a kernel; None: no path
    cpu: MissCosts | None  # None: CPU compute not available (no measurement)
    layer_s: float  # the copy path's host round trip per MoE layer: ids to the host, decide, launch
    step_s: float  # the rest of a step: dense layers, the experts' compute, sampling
    calibrated: bool = False  # step_s from a measured run of this model (else estimated)
    disk_s: float = 0.0  # one expert read from the checkpoint (O_DIRECT); 0: its experts are not on disk


@dataclass
class Traffic:
    """What one layout does over a trace's decode steps (prefill steps only fill the caches)."""

    steps: int = 0
    hits: int = 0
    streamed: int = 0
    cpu: int = 0
    in_place: int = 0  # missed experts read in place (the engine's gpu_misses on that path)
    disk: int = 0  # experts read from disk into the host cache
    lookups: int = 0  # every step's, prefill too: the engine's gpu_hit_rate counts them all
    all_hits: int = 0
    seconds: float = 0.0  # the traffic's time (everything but step_s)

    @property
    def hit_rate(self) -> float | None:
        return self.all_hits / self.lookups if self.lookups else None


@dataclass
class Prediction:
    layout: Layout
    slots_per_layer: float
    traffic: Traffic
    costs: Costs = field(repr=False)

    @property
    def step_s(self) -> float:
        return self.costs.step_s + self.traffic.seconds / max(self.traffic.steps, 1)

    @property
    def tok_s(self) -> float:
        return 1.0 / self.step_s

    def to_dict(self) -> dict:
        t = self.traffic
        per = max(t.steps, 1)
        return {
            "layout": self.layout.name,
            **self.layout.options(),
            "slots_per_layer": self.slots_per_layer,
            "gpu_hit_rate": t.hit_rate,
            "streamed_per_token": t.streamed / per,
            "cpu_per_token": t.cpu / per,
            "in_place_per_token": t.in_place / per,
            "disk_per_token": t.disk / per,
            "predicted_tok_s": self.tok_s,
            "calibrated": self.costs.calibrated,
        }


def simulate(
    trace: Trace, quotas: dict[int, int], layout: Layout, costs: Costs, host_slots: int | None = None
) -> Traffic:
    """Replay `trace` through a store of these per-layer slots under `layout`: the engine's decisions,
    hence its hit rate, and the seconds its traffic takes (batch-1 decode: one token a step).
    host_slots: the host cache's experts when it cannot hold them all (None: it holds them all)."""
    parts = {layer: LayerSlots(range(n), layout.eviction) for layer, n in quotas.items()}
    # in-place and staged: candidates only where the host cache holds every expert; staged, a miss is
    # admitted as on the copy path, by a kernel's copy with no host round trip
    staged = layout.miss_path == "staged"
    if layout.miss_path == "in-place":
        return _in_place(admissions(trace), parts, trace.num_experts, costs)
    traffic = Traffic()
    steps = set()
    recent = RoutedCounts(list(quotas), trace.num_experts)
    host = HostLru(host_slots)
    for adm in admissions(trace):
        part = parts[adm.layer]
        on_cpu = set()
        # The store computes on the CPU in steps of few pairs (decode; a prefill this short too).
        if layout.cpu_compute and len(adm.routed) <= GATHER_MAX_PAIRS and costs.cpu is not None:
            on_cpu = cpu_compute.choose(
                adm.routed, part.slot_of, costs.cpu, lambda e, layer=adm.layer: host.holds(layer, e),
                recent.of(adm.layer),
            )  # fmt: skip
            recent.add(adm.layer, adm.routed)
        hits, loaded = _admit(part, [e for e in adm.routed if e not in on_cpu])
        reads = host.fetch(adm.layer, [*on_cpu, *loaded])
        streamed = len(loaded)
        traffic.lookups += hits + streamed + len(on_cpu)
        traffic.all_hits += hits
        if adm.prefill:
            continue
        steps.add(adm.step)
        traffic.disk += reads
        traffic.seconds += reads * costs.disk_s
        traffic.hits += hits
        if staged:
            traffic.in_place += streamed
            traffic.seconds += streamed * costs.in_place_s
            continue
        traffic.streamed += streamed
        traffic.cpu += len(on_cpu)
        cpu_s = (
            costs.cpu.cpu_layer_s
            + sum(costs.cpu.cpu_cost(n) for e, n in Counter(adm.routed).items() if e in on_cpu)
            if on_cpu
            else 0.0
        )
        traffic.seconds += costs.layer_s + max(streamed * costs.stream_s, cpu_s)
    traffic.steps = len(steps)
    return traffic


def _admit(part: LayerSlots, routed: list[int]) -> tuple[int, list[int]]:
    """(hits, experts loaded) of one step's lookup, through the calls the store's copy path makes."""
    hits, loaded = [0], []

    def hit(slot: int) -> None:
        hits[0] += 1

    def load(expert: int, exclude: set[int]) -> int:
        loaded.append(expert)
        return part.claim(expert, exclude, prefetched=False)

    for _ in part.admit(part.schedule(routed), hit, load):
        pass
    return hits[0], loaded


class HostLru:
    """The host cache as the simulation keeps it: (layer, expert) keys in LRU order over all layers;
    capacity None holds everything."""

    def __init__(self, capacity: int | None):
        self.capacity, self.keys = capacity, OrderedDict()

    def holds(self, layer: int, expert: int) -> bool:
        return self.capacity is None or (layer, expert) in self.keys

    def fetch(self, layer: int, experts: list[int]) -> int:
        """One layer step's experts brought to the host (the held ones touched first, as the engine's
        read-ahead does, then the rest read); returns the reads from disk."""
        if self.capacity is None:
            return 0
        wanted = [(layer, e) for e in dict.fromkeys(experts)]
        for key in wanted:
            if key in self.keys:
                self.keys.move_to_end(key)
        missing = [key for key in wanted if key not in self.keys]
        for key in missing:
            if len(self.keys) >= self.capacity:
                self.keys.popitem(last=False)
            self.keys[key] = None
        return len(missing)


def _in_place(steps, parts: dict[int, LayerSlots], num_experts: int, costs: Costs) -> Traffic:
    """offload/in_place.py's decode over the admissions: an expert is read from its slot once admitted
    and landed (one step after its admission: copies land before the next step ends), else in place;
    prefill steps run the copy path and leave each layer's slots resident."""
    traffic = Traffic()
    recent = RoutedCounts(list(parts), num_experts)
    resident: dict[int, set[int]] = {layer: set() for layer in parts}
    pending: list[tuple[int, int, int]] = []  # (layer, expert, slot) copied after the last step
    by_step: dict[int, list] = {}
    for adm in steps:
        by_step.setdefault(adm.step, []).append(adm)
    decode_steps = 0
    for step_admissions in by_step.values():
        if step_admissions[0].prefill:
            for adm in step_admissions:
                part = parts[adm.layer]
                hits, loaded = _admit(part, adm.routed)
                traffic.lookups += hits + len(loaded)
                traffic.all_hits += hits
                resident[adm.layer] = set(part.slot_of)
                pending = [p for p in pending if p[0] != adm.layer]
            continue
        decode_steps += 1
        landed = [(layer, e) for layer, e, slot in pending if parts[layer].expert_of.get(slot) == e]
        seconds, admitted = 0.0, 0
        for adm in step_admissions:
            for e, n in Counter(adm.routed).items():
                traffic.lookups += 1
                if e in resident[adm.layer]:
                    traffic.hits += 1
                    traffic.all_hits += 1
                else:
                    traffic.in_place += 1
                    seconds += n * costs.in_place_s
        for layer, e in landed:
            resident[layer].add(e)
        pending = []
        for adm in step_admissions:
            recent.add(adm.layer, adm.routed)
        for adm in step_admissions:
            part = parts[adm.layer]
            group = part.waves(adm.routed)[0]
            exclude = {part.slot_of[e] for e in group if e in part.slot_of}
            for slot in exclude:
                part.policy.touch(slot)
            for e in group:
                if e not in part.slot_of and admits(recent.of(adm.layer), e, part, exclude):
                    before = dict(part.expert_of)
                    slot = part.claim(e, exclude, prefetched=False)
                    victim = before.get(slot)
                    if victim is not None:
                        resident[adm.layer].discard(victim)
                        pending = [p for p in pending if p[2] != slot or p[0] != adm.layer]
                    pending.append((adm.layer, e, slot))
                    exclude.add(slot)
                    admitted += 1
        traffic.seconds += seconds + admitted * costs.stream_s
    traffic.steps = decode_steps
    return traffic


def predict(
    trace: Trace, quotas: dict[int, int], layout: Layout, costs: Costs, host_slots: int | None = None
) -> Prediction:
    traffic = simulate(trace, quotas, layout, costs, host_slots)
    return Prediction(layout, sum(quotas.values()) / len(quotas), traffic, costs)


def calibrate(
    costs: Costs,
    trace: Trace,
    quotas: dict[int, int],
    layout: Layout,
    measured_step_s: float,
    host_slots: int | None = None,
) -> Costs:
    """costs with step_s fitted so that `layout` on `trace` (the calibration run's own routing, recorded)
    predicts the step time the engine measured on it."""
    traffic = simulate(trace, quotas, layout, costs, host_slots)
    step_s = measured_step_s - traffic.seconds / max(traffic.steps, 1)
    return replace(costs, step_s=max(step_s, 0.0), calibrated=True)


def choose(predictions: list[Prediction], preset: str) -> Prediction:
    """The preset's pick: the fastest, or the largest KV reserve within the preset's slack of it."""
    best = max(predictions, key=lambda p: p.tok_s)
    slack = PRESET_SLACK[preset]
    near = [p for p in predictions if p.tok_s >= (1 - slack) * best.tok_s]
    return max(near, key=lambda p: (p.layout.kv_reserve_tokens or 0, p.tok_s))


def save(path, chosen: Prediction, predictions: list[Prediction], meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {**meta, "chosen": chosen.to_dict(), "candidates": [p.to_dict() for p in predictions]}, indent=1
        )
    )
    return path
