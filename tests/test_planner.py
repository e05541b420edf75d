"""The planner: its simulation of a recorded trace reproduces the engine's hit rate for each layout,
the costs decide the pick, the calibration fits the measured step time."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.config import EngineConfig
from tiermoe.offload.cpu_compute import MissCosts
from tiermoe.planner import Costs, Layout, calibrate, choose, predict, simulate
from tiermoe.routing.synthetic import CALIBRATED, SZDRouting, synthetic_trace
from tiermoe.routing.trace import load_trace

from .conftest import budget_gib

PROMPT = [5, 17, 42, 99, 7, 11, 120, 64, 3, 200, 31, 8]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
FAST_CPU = MissCosts(stream_s=100e-6, cpu_s=60e-6, cpu_token_s=10e-6, cpu_layer_s=20e-6)


def costs(
    cpu: MissCosts | None = FAST_CPU,
    layer_s: float = 50e-6,
    step_s: float = 5e-3,
    in_place_s: float = 500e-6,
) -> Costs:
    return Costs(stream_s=100e-6, in_place_s=in_place_s, cpu=cpu, layer_s=layer_s, step_s=step_s)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    return path, LLM(path, device="cpu")


@pytest.fixture(scope="module")
def recorded(model, tmp_path_factory):
    """(trace, per-layer slots) of one greedy run at the default layout, 3 slots a layer."""
    path, resident = model
    trace_file = tmp_path_factory.mktemp("planner") / "trace.npz"
    llm = LLM(
        path, device="cpu", gpu_budget_gib=budget_gib(resident.plan, 3 * 4), record_routing=str(trace_file)
    )
    llm.generate(PROMPT, GREEDY)
    return load_trace(trace_file), llm.plan.quotas


LAYOUTS = [
    Layout("lfu", "copy"),
    Layout("lru", "copy"),
    Layout("lfu", "copy", cpu_compute=True),
    Layout("lfu", "in-place"),
    Layout("lru", "in-place"),
    Layout("lfu", "staged"),
    Layout("lru", "staged"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: v.name)
def test_the_simulation_reproduces_the_engines_hit_rate(model, tmp_path, layout):
    path, resident = model
    trace_file = tmp_path / "trace.npz"
    llm = LLM(
        path,
        device="cpu",
        gpu_budget_gib=budget_gib(resident.plan, 3 * 4),
        record_routing=str(trace_file),
        **layout.options(),
    )
    if layout.cpu_compute:
        llm.provider.cpu_costs = FAST_CPU
    stats = llm.generate(PROMPT, GREEDY)[0].stats.experts
    traffic = simulate(load_trace(trace_file), llm.plan.quotas, layout, costs())
    assert 0 < stats["gpu_hit_rate"] < 1
    assert traffic.hit_rate == pytest.approx(stats["gpu_hit_rate"], abs=1e-4)
    assert traffic.steps == GREEDY.max_tokens - 1  # the first token comes out of the prefill
    if layout.cpu_compute:
        assert traffic.cpu > 0 and stats["cpu_computed"] == traffic.cpu
    if layout.miss_path != "copy":
        assert traffic.in_place > 0 and traffic.streamed == 0


def test_costs_pick_the_layout_and_calibration_fits_the_measured_step(recorded):
    trace, quotas = recorded
    copy, cpu, in_place = Layout(), Layout(cpu_compute=True), Layout(miss_path="in-place")
    # Ten times the copy engine's speed: the CPU's share outweighs the hits its experts would have made.
    tenfold = costs(cpu=MissCosts(100e-6, 10e-6, 1e-6, 5e-6))
    fast_cpu = [predict(trace, quotas, lay, tenfold) for lay in (copy, cpu, in_place)]
    assert choose(fast_cpu, "latency").layout == cpu
    slow_cpu = costs(cpu=MissCosts(100e-6, 1e-3, 1e-4, 2e-4))
    assert choose([predict(trace, quotas, lay, slow_cpu) for lay in (copy, cpu)], "latency").layout == copy
    # A costly host round trip per layer (the copy path's) makes reading in place the faster path.
    slow_sync = costs(layer_s=2e-3, in_place_s=120e-6)
    assert (
        choose([predict(trace, quotas, lay, slow_sync) for lay in (copy, in_place)], "latency").layout
        == in_place
    )
    # Staged, each miss crosses once and is admitted; read in place, a miss is read again until it earns
    # a slot: at the same cost a byte, staging moves fewer at Qwen3-30B-A3B's shape and 8 GiB int4 slots
    # under szd routing (bench/NOTES.md 46 measured 213 MB a token against 382). At the tiny model's 8
    # experts and 3 slots a layer the in-place admission test keeps more hits: no general law.
    staged = Layout(miss_path="staged")
    qwen3 = SZDRouting(48, 128, 8, 0, torch.device("cpu"), CALIBRATED["qwen3_moe"])
    szd, slots = synthetic_trace(qwen3, list(range(48)), 1, 32, 64), dict.fromkeys(range(48), 34)
    by_layout = {p.layout: p for p in (predict(szd, slots, lay, slow_sync) for lay in (in_place, staged))}
    assert by_layout[staged].traffic.in_place < by_layout[in_place].traffic.in_place
    assert choose(list(by_layout.values()), "latency").layout == staged
    # Calibrated to a measured 8 ms step, the calibrating layout predicts 8 ms on its own trace.
    fitted = calibrate(costs(), trace, quotas, copy, measured_step_s=8e-3)
    assert fitted.calibrated and predict(trace, quotas, copy, fitted).step_s == pytest.approx(8e-3)


def test_presets_trade_speed_for_kv_tokens(recorded):
    trace, quotas = recorded
    fewer = {layer: n - 1 for layer, n in quotas.items()}  # a larger KV reserve leaves fewer slots
    fast = predict(trace, quotas, Layout(kv_reserve_tokens=256), costs())
    roomy = predict(trace, fewer, Layout(kv_reserve_tokens=4096), costs())
    assert fast.tok_s > roomy.tok_s
    assert choose([fast, roomy], "latency") is fast
    loss = 1 - roomy.tok_s / fast.tok_s
    assert choose([fast, roomy], "throughput") is (roomy if loss <= 0.10 else fast)


def test_plan_command_calibrates_saves_and_presets_reuse_it(model, tmp_path, monkeypatch, capsys):
    from tiermoe.cli import main
    from tiermoe.flags import engine_kwargs

    path, resident = model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    budget = f"{budget_gib(resident.plan, 3 * 4):.9f}"
    assert main(["plan", "--model", str(path), "--device", "cpu", "--gpu-budget", budget]) == 0
    out = capsys.readouterr().out
    saved = next((tmp_path / "tiermoe" / "plans").glob("*.json"))
    plan = json.loads(saved.read_text())
    # lfu, lru x copy, copy + CPU (no in-place without a GPU) x the KV reserves: the default (the tiny
    # model's whole context, 512), half and a quarter (256 both: the least offered)
    kv = sorted(c["kv_reserve_tokens"] for c in plan["candidates"])
    assert kv == [256] * 4 + [512] * 4 and "chosen (latency)" in out
    assert plan["costs"]["calibrated"] and plan["costs"]["cpu"]["cpu_s"] > 0
    # Calibrated on its own run, the default layout's prediction is the measured step time.
    default = next(c for c in plan["candidates"] if c["layout"] == plan["calibration"]["layout"])
    assert 1 / default["predicted_tok_s"] == pytest.approx(plan["calibration"]["measured_step_s"], rel=1e-6)
    # The bench finds each run's prediction in the saved plan by its model, budgets and layout.
    from tiermoe.planning import predicted

    run = {**{k: default[k] for k in ("eviction", "miss_path", "cpu_compute", "kv_reserve_tokens")},
           "gpu_budget_gib": float(budget), "cpu_budget_gib": None, "routing": "natural", "prefetch": False}  # fmt: skip
    assert predicted(path, run) == default["predicted_tok_s"]
    assert predicted(path, {**run, "gpu_budget_gib": 4.0}) is None
    # --preset reads the saved plan: the pick's layout, and flags given beside it win.
    from tiermoe.cli import build_parser

    args = build_parser("generate").parse_args(
        ["generate", "--model", str(path), "--device", "cpu", "--gpu-budget", budget, "--preset", "latency",
         "--eviction", "lru"]
    )  # fmt: skip
    kwargs = engine_kwargs(args)
    best = max(plan["candidates"], key=lambda c: c["predicted_tok_s"])
    assert kwargs["eviction"] == "lru" and kwargs["cpu_compute"] == best["cpu_compute"]
    assert kwargs["kv_reserve_tokens"] == best["kv_reserve_tokens"]
    assert "plan (latency)" in capsys.readouterr().err


def test_a_host_cache_below_the_experts_is_simulated_with_its_disk_reads(recorded):
    trace, quotas = recorded
    slow_disk = replace(costs(), disk_s=2e-3)
    held = predict(trace, quotas, Layout(), slow_disk)  # a host cache holding every expert: no reads
    small = predict(trace, quotas, Layout(), slow_disk, host_slots=6)
    assert held.traffic.disk == 0 and small.traffic.disk > 0
    assert small.traffic.hit_rate == held.traffic.hit_rate  # the GPU's slots decide the hit rate
    assert small.step_s == pytest.approx(held.step_s + small.traffic.disk * 2e-3 / small.traffic.steps)
    # On the CPU path only experts the host holds are computed there: fewer, with 6 of 128 held.
    cpu = Layout(cpu_compute=True)
    tenfold = replace(slow_disk, cpu=MissCosts(100e-6, 10e-6, 1e-6, 5e-6))
    assert (
        predict(trace, quotas, cpu, tenfold, host_slots=6).traffic.cpu
        < predict(trace, quotas, cpu, tenfold).traffic.cpu
    )


def test_disk_reads_are_timed_on_a_real_checkpoint(model):
    from tiermoe.planning import disk_read_s

    path, _ = model
    assert 0 < disk_read_s(path, EngineConfig(device="cpu")) < 1.0


def test_a_plan_without_calibration_loads_no_model(model, tmp_path, monkeypatch):
    from tiermoe import planning
    from tiermoe.cli import main

    path, resident = model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(planning, "calibration_run", lambda *a: pytest.fail("the model was loaded"))
    budget = f"{budget_gib(resident.plan, 3 * 4):.9f}"
    assert (
        main(["plan", "--model", str(path), "--device", "cpu", "--gpu-budget", budget, "--no-calibrate"]) == 0
    )
    plan = json.loads(next((tmp_path / "tiermoe" / "plans").glob("*.json")).read_text())
    assert not plan["costs"]["calibrated"] and plan["calibration"]["measured_step_s"] is None
    assert len(plan["candidates"]) == 8 and all(c["gpu_hit_rate"] > 0 for c in plan["candidates"])
