"""Planning a model's layout for `tiermoe plan` and `--preset`: measure this machine's costs for the
model, calibrate the engine on it, simulate every candidate layout (planner.py), keep the preset's pick.

The plan is saved per (model, budgets, device, dtype, routing) under ~/.cache/tiermoe/plans, so a
command run with `--preset` plans once (a model load and a short decode) and reuses it after.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import EngineConfig, user_cache_dir
from .formats.registry import format_for
from .models.registry import from_config
from .offload import cpu_compute
from .offload.budget import MemoryPlan
from .offload.in_place import staging_fits
from .offload.placement import DEFAULT_KV_TOKENS, plan_from_config
from .planner import Costs, Layout, calibrate, choose, predict
from .routing.trace import Trace, load_trace

GB = 1e9
CALIBRATION_PROMPT, CALIBRATION_TOKENS = 128, 48  # tokens of the calibration run (bench's Qwen3 workload)
ROUND_TRIPS = 200  # timed host round trips (the copy path's per-layer cost)
# The settings a plan depends on besides the ones it chooses: a plan saved for others is not reused.
# Plans of an older version are made again: 2, staged is its own miss path (version 1's in-place
# candidate was simulated staged where the workspace held the buffer, and would now run read in place);
# 3, LFU's counts decay smoothly (a half-life of 64 touches), so every simulated hit rate moved.
PLAN_VERSION = 3
PLAN_KEYS = (
    "gpu_budget_gib", "cpu_budget_gib", "workspace_gib", "kv_reserve_tokens", "experts_per_token", "device",
    "dtype", "routing", "max_model_len",
)  # fmt: skip


def plan_path(model_dir: str | Path, config: EngineConfig) -> Path:
    """Where the plan for this model and these settings is kept."""
    device = config.torch_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = {
        "model": str(Path(model_dir).resolve()),
        "gpu": name,
        "version": PLAN_VERSION,
        **{k: getattr(config, k) for k in PLAN_KEYS},
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return user_cache_dir() / "plans" / f"{Path(model_dir).name}-{digest}.json"


def layouts(hf_config: dict, base: EngineConfig, cpu: bool) -> list[tuple[Layout, MemoryPlan]]:
    """The candidate grid and each one's memory plan: eviction (lfu, lru) x miss path (copy, copy with CPU
    compute where measured, in-place where the host cache holds every expert, staged where it does and the
    workspace holds the staging buffer) x KV reserve (the default, half, a quarter: fewer KV tokens leave
    more expert slots). Infeasible candidates are left out."""
    context = from_config(hf_config)[2].context_len(base.max_model_len)
    default_kv = base.kv_reserve_tokens or min(context, DEFAULT_KV_TOKENS)
    kv_choices = sorted({default_kv, max(default_kv // 2, 256), max(default_kv // 4, 256)}, reverse=True)
    out = []
    for kv in kv_choices:
        plan = plan_from_config(hf_config, replace(base, kv_reserve_tokens=kv))
        if plan.all_resident:  # nothing moves: the store's settings change nothing
            out.append((Layout(kv_reserve_tokens=kv), plan))
            continue
        for eviction in ("lfu", "lru"):  # lfu first: the calibration runs the first layout
            out.append((Layout(eviction, "copy", False, kv), plan))
            if cpu:
                out.append((Layout(eviction, "copy", True, kv), plan))
            if plan.host_slots >= plan.total_experts and base.torch_device.type == "cuda":
                out.append((Layout(eviction, "in-place", False, kv), plan))
                if staging_fits(plan):
                    out.append((Layout(eviction, "staged", False, kv), plan))
    return out


def measure_costs(hf_config: dict, config: EngineConfig, plan: MemoryPlan) -> Costs:
    """This machine's seconds per expert on each path (experts of the model's format, random bytes),
    the host round trip per layer, and an estimate of the rest of a step (the dense weights read once at
    HBM speed) that calibration replaces."""
    from .hardware import gpu_copy_bandwidth, h2d_bandwidth, time_cpu, zero_copy_bandwidth

    args = from_config(hf_config)[2]
    device, dtype = config.torch_device, config.torch_dtype
    fmt = format_for(hf_config, *args.expert_shape, dtype, args.expert_kind)
    cuda = device.type == "cuda"
    # Enough experts that the CPU's cost is timed from DRAM (cpu_compute.COLD_BYTES), copies of one random one.
    bank = fmt.empty(cpu_compute.timing_experts(fmt.nbytes, 256), pin_memory=cuda)
    fmt.fill_random(bank[0], torch.Generator().manual_seed(0), 0.02)
    bank[1:] = bank[0]
    expert = bank[0]
    if cuda:
        stream_s = fmt.nbytes / (h2d_bandwidth(fmt.nbytes, pinned=True, total_bytes=1 << 30) * GB)
        in_place_s = fmt.nbytes / (zero_copy_bandwidth(64 << 20) * GB)
        hbm = gpu_copy_bandwidth(256 << 20) / 2 * GB  # read + write counted: half is the read rate
    else:
        scratch = fmt.empty(1)[0]
        stream_s = time_cpu(lambda: scratch.copy_(expert), min_s=0.01)
        in_place_s, hbm = None, None
    return Costs(
        stream_s=stream_s,
        in_place_s=in_place_s,
        cpu=cpu_compute.measure(fmt, list(bank), fmt.empty(1, device)[0], dtype),
        layer_s=round_trip_s(device, args.top_k),
        step_s=plan.dense_bytes / hbm if hbm else 0.0,
    )


def disk_read_s(model_dir: str | Path, config: EngineConfig, reads: int = 3) -> float:
    """One expert read from the checkpoint as the host cache reads it (O_DIRECT, through the format's
    parts), the median of a few of the last layer's; 0 where the experts are not on disk (synthetic)."""
    from .offload.sources import SyntheticExperts, open_expert_source
    from .weights.loader import open_source

    source = open_source(model_dir, torch.device("cpu"), config.torch_dtype, config.experts_per_token)
    experts = open_expert_source(source)
    if isinstance(experts, SyntheticExperts):
        return 0.0
    buffer = source.format.empty(1)[0]
    layer, last = source.args.moe_layers[-1], source.args.num_experts - 1
    times = []
    for e in range(min(reads, last + 1)):
        start = time.perf_counter()
        experts.read_into(layer, last - e, buffer)
        times.append(time.perf_counter() - start)
    experts.close()
    return sorted(times)[len(times) // 2]


def host_slots_of(plan: MemoryPlan) -> int | None:
    """The host cache's experts for the simulation: None when it holds them all."""
    return None if plan.host_slots >= plan.total_experts else plan.host_slots


def round_trip_s(device: torch.device, top_k: int) -> float:
    """One MoE layer's host round trip on the copy path: the routed ids to the host (a synchronisation
    behind a kernel), a slot table built and sent back, an index on the device."""
    ids = torch.randint(0, 64, (1, top_k), device=device)
    x = torch.zeros(1, 2048, device=device)

    def once():
        x.mul_(1.0)  # a kernel the sync waits behind
        routed = ids.reshape(-1).tolist()
        lut = torch.full((64,), -1, dtype=torch.long)
        lut[routed] = torch.arange(len(routed))
        lut.to(device)[ids]

    once()
    start = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        once()
    return (time.perf_counter() - start) / ROUND_TRIPS


def calibration_run(model_dir: str | Path, kwargs: dict, layout: Layout) -> tuple[float, Trace]:
    """The engine at `layout` decodes a seeded prompt after a warm-up, its routing recorded: (seconds per
    decode step, the timed run's trace)."""
    from . import LLM, SamplingParams

    with tempfile.TemporaryDirectory(prefix="tiermoe-plan-") as tmp:
        trace_file = Path(tmp) / "trace.npz"
        llm = LLM(model_dir, **{**kwargs, **layout.options(), "record_routing": str(trace_file)})
        vocab = llm.source.checkpoint.config["vocab_size"]
        prompt = torch.randint(0, vocab, (CALIBRATION_PROMPT,), generator=torch.Generator().manual_seed(1))
        greedy = SamplingParams(max_tokens=CALIBRATION_TOKENS, temperature=0.0, ignore_eos=True)
        llm.generate([prompt[:8].tolist()], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        stats = llm.generate([prompt.tolist()], greedy)[0].stats
        trace = last_run(load_trace(trace_file))
        del llm
        _release_gpu_memory()
    return stats.decode_s / (stats.completion_tokens - stats.sequences), trace


def szd_trace(hf_config: dict, seed: int) -> Trace:
    """The calibration workload's routing as the szd model routes it for this model, without loading it."""
    from .routing.spec import parse_routing, routing_model
    from .routing.synthetic import synthetic_trace

    args = from_config(hf_config)[2]
    spec = parse_routing("szd", hf_config.get("model_type", ""))
    model = routing_model(spec, len(args.moe_layers), args.num_experts, args.top_k, seed, torch.device("cpu"))
    return synthetic_trace(model, args.moe_layers, 1, CALIBRATION_PROMPT, CALIBRATION_TOKENS)


def last_run(trace: Trace) -> Trace:
    """The rows of the trace's last document (the timed run after the warm-up)."""
    keep = trace.seq == trace.seq.max()
    cols = (trace.seq, trace.token, trace.layer, trace.prefill, trace.step, trace.experts)
    return Trace.build(*(c[keep] for c in cols), num_experts=trace.num_experts)


def make_plan(
    model_dir: str | Path, kwargs: dict, preset: str, progress=print, calibrated: bool = True
) -> dict:
    """Measure, calibrate, simulate, choose (preset: latency, throughput or balanced); the saved plan's
    content. The calibration runs the candidate grid's first layout: the default KV reserve, lfu, copy.
    calibrated False: no model load; an szd trace from the routing model and an estimated step."""
    config = engine_config(kwargs)
    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    grid = layouts(hf_config, config, cpu=True)
    default, default_plan = grid[0]
    progress(f"plan: measuring this machine's costs ({len(grid)} candidate layouts)")
    costs = measure_costs(hf_config, config, default_plan)
    _release_gpu_memory()  # the bandwidth probes' buffers: the calibration's default budget must not miss them
    if host_slots_of(default_plan) is not None:  # the disk tier takes part: its reads are measured too
        costs = replace(costs, disk_s=disk_read_s(model_dir, config))
    progress(f"plan: {costs.cpu.describe() if costs.cpu else 'no CPU compute'}")
    measured_step_s = None
    if calibrated:
        progress(f"plan: calibrating at {default.name}")
        measured_step_s, trace = calibration_run(model_dir, kwargs, default)
        costs = calibrate(
            costs, trace, default_plan.quotas, default, measured_step_s, host_slots_of(default_plan)
        )
    else:
        trace = szd_trace(hf_config, config.routing_seed)
    predictions = [predict(trace, plan.quotas, lay, costs, host_slots_of(plan)) for lay, plan in grid]
    predictions.sort(key=lambda p: -p.tok_s)
    chosen = choose(predictions, preset)
    return {
        "model": str(Path(model_dir).resolve()),
        "preset": preset,
        "settings": {k: getattr(config, k) for k in PLAN_KEYS},
        "costs": {k: v for k, v in vars(costs).items() if k != "cpu"}
        | {"cpu": vars(costs.cpu) if costs.cpu else None},
        "calibration": {"layout": default.name, "measured_step_s": measured_step_s},
        "chosen": chosen.to_dict(),
        "candidates": [p.to_dict() for p in predictions],
    }


def resolve(model_dir: str | Path, kwargs: dict, preset: str, command: str, progress=None) -> dict:
    """LLM keywords with the preset's layout filled in (flags the user gave win), planning first when no
    plan for these settings is saved. auto: throughput for the server, latency otherwise."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    preset = concrete(preset, command)
    config = engine_config(kwargs)
    path = plan_path(model_dir, config)
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved is None:
        progress(f"plan: no saved plan for {Path(model_dir).name} at these settings; planning (once)")
        saved = make_plan(model_dir, kwargs, preset, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1))
    picked = pick(saved, preset)
    estimate = "" if picked["calibrated"] else " (uncalibrated: the order, not the figure)"
    progress(
        f"plan ({preset}): {picked['layout']}, predicted {picked['predicted_tok_s']:.1f} tok/s{estimate}"
    )
    merged = {**Layout.options_of(picked), **kwargs}  # the flags given win
    if merged["cpu_compute"] and merged["miss_path"] not in ("auto", "copy"):  # a flag given against the pick
        if "miss_path" in kwargs:
            merged["cpu_compute"] = False
        else:
            merged["miss_path"] = "copy"
    return merged


def engine_config(kwargs: dict) -> EngineConfig:
    """The EngineConfig of LLM keywords (the command's progress display is no engine setting)."""
    return EngineConfig(**{k: v for k, v in kwargs.items() if k != "show_progress"})


def concrete(preset: str, command: str) -> str:
    """auto as the command means it: throughput for the server, latency otherwise."""
    if preset == "auto":
        return "throughput" if command == "serve" else "latency"
    return preset


def _release_gpu_memory() -> None:
    """Give freed CUDA memory back to the driver: the engine's default budget is the free memory."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predicted(model_dir: str | Path, run: dict) -> float | None:
    """The predicted tok/s of a bench run's layout in a saved plan of the same model, budgets and routing
    (a plan made without --routing counts for any: the engine's default routing); None when none has it."""
    layout = {"prefetch": False, **run}  # a run that does not say had the engine's default, off
    model = str(Path(model_dir).resolve())
    for path in sorted((user_cache_dir() / "plans").glob("*.json")):
        saved = json.loads(path.read_text())
        settings = saved.get("settings", {})
        if (
            saved.get("model") != model
            or settings.get("routing") not in (None, run.get("routing"))
            or any(settings.get(k) != run.get(k) for k in ("gpu_budget_gib", "cpu_budget_gib"))
        ):
            continue
        for c in saved["candidates"]:
            if all(c.get(k) == layout.get(k) for k in Layout().options()):
                return c["predicted_tok_s"]
    return None


def pick(saved: dict, preset: str) -> dict:
    """The preset's candidate among a saved plan's (predicted tok/s and KV reserve are all it needs)."""
    from .planner import PRESET_SLACK

    best = max(c["predicted_tok_s"] for c in saved["candidates"])
    near = [c for c in saved["candidates"] if c["predicted_tok_s"] >= (1 - PRESET_SLACK[preset]) * best]
    return max(near, key=lambda c: (c["kv_reserve_tokens"] or 0, c["predicted_tok_s"]))
