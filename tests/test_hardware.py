"""profile measures positive ceilings on the CPU, skips GPU ones with a reason, and the floor arithmetic;
the memory plan made from config.json alone is the engine's own."""

import argparse
import json
import shlex
import sys

import pytest
import torch

from tiermoe import LLM, hardware
from tiermoe.bench.presets import get_preset
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.config import EngineConfig
from tiermoe.errors import BudgetError
from tiermoe.hardware import GB, GIB, decode_floor, measured_floor, missed_expert_bytes_per_token
from tiermoe.offload.budget import MemoryPlan
from tiermoe.offload.placement import plan_from_config
from tiermoe.offload.store import TieredExpertStore


def test_quick_profile_on_cpu_measures_positive_ceilings(tmp_path):
    threads = torch.get_num_threads()
    measured = {m.name: m for m in hardware.profile(quick=True, disk_dir=tmp_path)}
    for name in ("disk read", "disk write", "CPU copy (read+write)", "CPU matmul fp32", "CPU matmul bf16"):
        assert measured[name].value > 0, name
    # A disk that reads faster than 1 TB/s or RAM at 10 TB/s would mean the timer is broken.
    assert measured["disk read"].value < 1000 and measured["CPU copy (read+write)"].value < 10_000
    assert "O_DIRECT" in measured["disk read"].note
    assert not list(tmp_path.iterdir())  # the scratch file is removed
    # The CPU share's speed, torch's path and tiermoe's kernel (built here: CI has a compiler), under
    # RAM's copy rate (read and write counted: reads alone are at most twice that).
    for name in (
        "CPU experts bf16, torch",
        "CPU experts bf16, tiermoe kernel",
        "CPU experts int4, tiermoe kernel",
    ):
        assert 0 < measured[name].value < 2 * measured["CPU copy (read+write)"].value, name
    assert "compiled" in measured["CPU experts int4, tiermoe kernel"].note
    # The scaling curve below torch's thread count (2 on CI: one thread), and the count restored.
    for n in hardware.thread_counts(torch.get_num_threads()):
        for name in (
            f"CPU experts bf16, tiermoe kernel, {n} threads",
            f"CPU experts int4, tiermoe kernel, {n} threads",
            f"CPU copy (read+write), {n} threads",
        ):
            assert measured[name].value > 0, name
    assert torch.get_num_threads() == threads
    assert hardware.thread_counts(16) == [1, 2, 4, 8] and hardware.thread_counts(12) == [1, 2, 4, 8]
    assert hardware.thread_counts(1) == []
    if not torch.cuda.is_available():
        gpu = (
            "H2D pinned 2.5MB",
            "H2D pageable 9.4MB",
            "GPU copy (read+write)",
            "zero-copy read pinned",
            "GPU GEMM bf16",
        )
        for name in gpu:
            assert measured[name].value is None and "no CUDA" in measured[name].note


def test_decode_floor_arithmetic():
    # 1 GB missed per token over 50 GB/s PCIe: 50 tok/s; RAM at 100 GB/s: 100 tok/s unless compute binds.
    f = decode_floor(1e9, h2d_gb_s=50, cpu_mem_gb_s=100)
    assert f.pcie_tok_s == pytest.approx(50) and f.cpu_tok_s == pytest.approx(100)
    # 1 GB of bf16 is 0.5 G params, 1 GFLOP per token; 20 GFLOP/s of CPU makes compute the bound.
    assert decode_floor(1e9, 50, 100, cpu_gflop_s=20).cpu_tok_s == pytest.approx(20)
    assert decode_floor(0, 50, 100) == hardware.DecodeFloor(0.0, None, None)
    assert decode_floor(1e9, None, None).pcie_tok_s is None


def _plan(quotas: dict[int, int], experts_per_layer: int, expert_bytes: int = 1000) -> MemoryPlan:
    total = len(quotas) * experts_per_layer
    return MemoryPlan(0, 0, 0, expert_bytes, total, sum(quotas.values()), quotas, 0)


def test_missed_bytes_follow_the_plan():
    # 4 layers of 64 experts, 8 slots each, top-8: uniform routing finds 8/64 of its experts resident.
    plan = _plan({0: 8, 1: 8, 2: 8, 3: 8}, 64)
    assert hardware.uniform_hit_rate(plan) == pytest.approx(0.125)
    assert missed_expert_bytes_per_token(plan, 8) == pytest.approx(4 * 8 * 1000 * 0.875)
    # At a measured hit rate instead of uniform routing's.
    assert missed_expert_bytes_per_token(plan, 8, hit_rate=0.5) == pytest.approx(4 * 8 * 1000 * 0.5)
    assert missed_expert_bytes_per_token(_plan({0: 64, 1: 64}, 64), 8) == 0  # all resident
    # A batch of 64 shares loads: far fewer bytes per token than 64 separate tokens.
    b64 = missed_expert_bytes_per_token(plan, 8, 64)
    assert b64 == pytest.approx(4 * 64 * (1 - (1 - 8 / 64) ** 64) * 1000 * 0.875 / 64)
    assert b64 < missed_expert_bytes_per_token(plan, 8, 1) / 7
    # Uneven quotas: the hit rate is the mean over layers of slots / experts.
    assert hardware.uniform_hit_rate(_plan({0: 9, 1: 8}, 64)) == pytest.approx(17 / 128)


def test_plan_of_olmoe_at_4_gib_has_the_slots_the_engine_reported():
    # bench/NOTES.md: on the GPU (1 GiB workspace), OLMoE-1B-7B at 4 GiB holds 137 of 1024 experts.
    engine = EngineConfig(gpu_budget_gib=4, workspace_gib=1.0, dtype="bf16", device="cpu")
    plan = plan_from_config(get_preset("olmoe-1b-7b").config, engine)
    assert (plan.gpu_slots, plan.total_experts, plan.expert_bytes) == (137, 1024, 3 * 2048 * 1024 * 2)
    # 4096 tokens in whole blocks of 16, and the null block
    assert plan.kv_bytes == (4096 + 16) * 16 * 2 * 16 * 128 * 2 and plan.workspace_bytes == GIB
    with pytest.raises(BudgetError, match="too small"):
        plan_from_config(get_preset("olmoe-1b-7b").config, EngineConfig(gpu_budget_gib=1, device="cpu"))


@pytest.mark.parametrize(("preset", "dtype"), [("tiny-qwen2-moe", "bf16"), ("tiny-olmoe", "fp32")])
def test_plan_from_config_is_the_engines_plan(tmp_path, preset, dtype):
    synth_checkpoint(preset, tmp_path / "m", progress=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # A budget of the fixed part plus 5.5 experts: 5 slots, so the tiered store runs (not all resident).
    fixed = plan_from_config(config, EngineConfig(dtype=dtype, kv_reserve_tokens=64))
    budget = (fixed.dense_bytes + fixed.kv_bytes + 5.5 * fixed.expert_bytes) / GIB
    keywords = {"dtype": dtype, "kv_reserve_tokens": 64, "gpu_budget_gib": budget, "cpu_budget_gib": 0.01}
    llm = LLM(tmp_path / "m", **keywords)
    assert llm.plan == plan_from_config(config, EngineConfig(**keywords))
    assert llm.plan.gpu_slots == 5 and isinstance(llm.provider, TieredExpertStore)
    assert llm.store_stats()["gpu_slots"] == 5


def test_floor_at_the_measured_traffic():
    # 1 GB per token over 50 GB/s: 20 ms; the uncapped run's step: 10 ms. Overlapped, the transfer
    # binds (50 tok/s); one after the other, 30 ms (33.3 tok/s).
    f = measured_floor(1e9, 50.0, 0.01)
    assert f.floor_tok_s == pytest.approx(50) and f.floor_serial_tok_s == pytest.approx(1 / 0.03)
    assert "PCIe 1,000.00 MB/token at 50.0 GB/s" in f.floor_note and "uncapped run" in f.floor_note
    # A run that moved little is bound by compute.
    assert measured_floor(1e8, 50.0, 0.01).floor_tok_s == pytest.approx(100)
    # Terms that are missing are said so; none at all gives no floor.
    only_pcie = measured_floor(1e9, 50.0, None)
    assert only_pcie.floor_tok_s == only_pcie.floor_serial_tok_s == pytest.approx(50)
    assert "no all-resident term" in only_pcie.floor_note
    assert measured_floor(1e9, None, 0.01).floor_tok_s == pytest.approx(100)
    assert "no PCIe term (no H2D bandwidth)" in measured_floor(1e9, None, 0.01).floor_note
    nothing = measured_floor(None, 50.0, None)
    assert nothing.floor_tok_s is None and nothing.floor_serial_tok_s is None


def _profile(tmp_path, monkeypatch, *flags):
    parser = argparse.ArgumentParser()
    hardware.add_parser(parser.add_subparsers())
    argv = ["profile", "--quick", "--out", str(tmp_path / "p.json"), "--model", str(tmp_path / "m"), *flags]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/tiermoe", *argv])
    args = parser.parse_args(argv)
    return args.func(args), argv


def test_profile_command_writes_json_with_floor(tmp_path, monkeypatch):
    synth_checkpoint("tiny-olmoe", tmp_path / "m", progress=False)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # The smallest budget the engine takes: top-k (2) slots in each of the 2 layers, 4 of 16 experts.
    least = plan_from_config(config, EngineConfig(dtype="bf16"))
    budget = (least.dense_bytes + least.kv_bytes + 4.5 * least.expert_bytes) / GIB
    status, argv = _profile(
        tmp_path, monkeypatch, "--gpu-budget", repr(budget), "--dtype", "bf16", "--hit-rate", "0.75"
    )
    assert status == 0
    data = json.loads((tmp_path / "p.json").read_text())
    for key in ("command", "git_rev", "device", "driver", "torch_version", "date"):
        assert key in data
    assert data["command"] == shlex.join(["tiermoe", *argv])
    floor = data["decode_floor"]
    assert floor["plan"]["gpu_slots"] == 4 and floor["plan"]["slots_per_layer"] == [2, 2]
    assert floor["plan"]["dense_bytes"] == least.dense_bytes
    # tiny-olmoe: 2 experts × 2 layers × 3 × 64 × 32 bf16 weights per token; uniform routing finds 2 of 8.
    per_token = 2 * 2 * 3 * 64 * 32 * 2
    assert floor["expert_bytes_per_token"] == per_token and floor["uniform_hit_rate"] == 0.25
    assert floor["missed_bytes_per_token"] == pytest.approx(0.75 * per_token)
    assert floor["at_hit_rate"]["hit_rate"] == 0.75
    assert floor["at_hit_rate"]["missed_bytes_per_token"] == pytest.approx(0.25 * per_token)
    cpu_copy = next(m["value"] for m in data["measurements"] if m["name"] == "CPU copy (read+write)")
    assert floor["cpu_tok_s"] <= cpu_copy * GB / floor["missed_bytes_per_token"] * 1.0001


def test_profile_refuses_a_budget_the_engine_refuses_before_measuring(tmp_path, monkeypatch):
    synth_checkpoint("tiny-olmoe", tmp_path / "m", progress=False)
    monkeypatch.setattr(hardware, "profile", lambda **_: pytest.fail("measured before checking the budget"))
    with pytest.raises(BudgetError, match="raise --gpu-budget"):
        _profile(tmp_path, monkeypatch, "--gpu-budget", "0")


@pytest.mark.gpu
def test_gpu_ceilings_are_measured():
    measured = {m.name: m for m in hardware.profile(quick=True)}
    assert measured["H2D pinned 9.4MB"].value > measured["H2D pageable 9.4MB"].value * 0.5 > 0
    assert measured["GPU copy (read+write)"].value > 100
    # a kernel reading host memory in place: PCIe's order of magnitude, not HBM's
    assert 1 < measured["zero-copy read pinned"].value < measured["H2D pinned 9.4MB"].value * 1.5
    assert measured["GPU GEMM bf16"].value > 1


def test_floor_uses_h2d_measured_nearest_the_expert_size():
    Measurement = hardware.Measurement
    measured = [
        Measurement("H2D pinned 2.5MB", 30.0, "GB/s"),
        Measurement("H2D pinned 9.4MB", 45.0, "GB/s"),
        Measurement("H2D pageable 9.4MB", 15.0, "GB/s"),
        Measurement("H2D pinned 48MB", 50.0, "GB/s"),
        Measurement("H2D pinned 1GiB", None, "GB/s", "skipped"),
    ]
    assert hardware.h2d_near(measured, 12_582_912) == ("9.4MB", 45.0)  # one OLMoE expert
    assert hardware.h2d_near(measured, 2 << 30) == ("48MB", 50.0)  # 1GiB was not measured
    assert hardware.h2d_near(measured[2:3], 1) is None


def test_read_in_place_reads_memory_through_its_address():
    """The zero-copy probe's kernel (Triton's interpreter on the CPU): the words at an address, as held."""
    pytest.importorskip("triton")
    from tiermoe.formats.triton_kernels import read_in_place

    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = (
        torch.arange(4096, dtype=torch.int32).pin_memory()
        if device == "cuda"
        else torch.arange(4096, dtype=torch.int32)
    )
    out = torch.zeros(4096, dtype=torch.int32, device=device)
    read_in_place(torch.tensor([src.data_ptr()], device=device), out)
    assert torch.equal(out.cpu(), src)
