"""profile measures positive ceilings on the CPU, skips GPU ones with a reason, and the floor arithmetic."""

import argparse
import json
import shlex
import sys

import pytest
import torch

from tiermoe import hardware
from tiermoe.bench.presets import get_preset
from tiermoe.bench.shapes import checkpoint_size
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.hardware import GB, GIB, decode_floor, missed_expert_bytes_per_token


def test_quick_profile_on_cpu_measures_positive_ceilings(tmp_path):
    measured = {m.name: m for m in hardware.profile(quick=True, disk_dir=tmp_path)}
    for name in ("disk read", "disk write", "CPU copy (read+write)", "CPU matmul fp32", "CPU matmul bf16"):
        assert measured[name].value > 0, name
    # A disk that reads faster than 1 TB/s or RAM at 10 TB/s would mean the timer is broken.
    assert measured["disk read"].value < 1000 and measured["CPU copy (read+write)"].value < 10_000
    assert "O_DIRECT" in measured["disk read"].note
    assert not list(tmp_path.iterdir())  # the scratch file is removed
    if not torch.cuda.is_available():
        for name in ("H2D pinned 2.5MB", "H2D pageable 9.4MB", "GPU copy (read+write)", "GPU GEMM bf16"):
            assert measured[name].value is None and "no CUDA" in measured[name].note


def test_decode_floor_arithmetic():
    # 1 GB missed per token over 50 GB/s PCIe: 50 tok/s; RAM at 100 GB/s: 100 tok/s unless compute binds.
    f = decode_floor(1e9, h2d_gb_s=50, cpu_mem_gb_s=100)
    assert f.pcie_tok_s == pytest.approx(50) and f.cpu_tok_s == pytest.approx(100)
    # 1 GB of bf16 is 0.5 G params, 1 GFLOP per token; 20 GFLOP/s of CPU makes compute the bound.
    assert decode_floor(1e9, 50, 100, cpu_gflop_s=20).cpu_tok_s == pytest.approx(20)
    assert decode_floor(0, 50, 100) == hardware.DecodeFloor(0.0, None, None)
    assert decode_floor(1e9, None, None).pcie_tok_s is None


def test_missed_bytes_follow_the_budget():
    cfg = get_preset("olmoe-1b-7b").config
    size = checkpoint_size(cfg)
    per_expert = 3 * 2048 * 1024 * 2
    # Budget holding only the dense weights: every one of 8 experts × 16 layers misses.
    assert missed_expert_bytes_per_token(cfg, size.dense_bytes / GIB, 1) == pytest.approx(8 * 16 * per_expert)
    # Half the experts resident: half the bytes miss.
    half = (size.dense_bytes + size.expert_bytes / 2) / GIB
    assert missed_expert_bytes_per_token(cfg, half, 1) == pytest.approx(4 * 16 * per_expert)
    assert missed_expert_bytes_per_token(cfg, 1000, 1) == 0
    assert missed_expert_bytes_per_token(cfg, None, 1) == 0
    # A batch of 64 shares loads: far fewer bytes per token than 64 separate tokens.
    b64 = missed_expert_bytes_per_token(cfg, 0, 64)
    assert b64 == pytest.approx(16 * 64 * (1 - (1 - 8 / 64) ** 64) * per_expert / 64)
    assert b64 < missed_expert_bytes_per_token(cfg, 0, 1) / 7


def test_profile_command_writes_json_with_floor(tmp_path, monkeypatch):
    synth_checkpoint("tiny-olmoe", tmp_path / "m", progress=False)
    parser = argparse.ArgumentParser()
    hardware.add_parser(parser.add_subparsers())
    out = tmp_path / "p.json"
    argv = ["profile", "--quick", "--out", str(out), "--model", str(tmp_path / "m"), "--gpu-budget", "0"]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/tiermoe", *argv])
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    for key in ("command", "git_rev", "device", "driver", "torch_version", "date"):
        assert key in data
    assert data["command"] == shlex.join(["tiermoe", *argv])
    floor = data["decode_floor"]
    # tiny-olmoe: 2 experts × 2 layers × 3 × 64 × 32 bf16 weights per token, all missed at budget 0.
    assert floor["expert_bytes_per_token"] == floor["missed_bytes_per_token"] == 2 * 2 * 3 * 64 * 32 * 2
    cpu_copy = next(m["value"] for m in data["measurements"] if m["name"] == "CPU copy (read+write)")
    assert floor["cpu_tok_s"] <= cpu_copy * GB / floor["missed_bytes_per_token"] * 1.0001


@pytest.mark.gpu
def test_gpu_ceilings_are_measured():
    measured = {m.name: m for m in hardware.profile(quick=True)}
    assert measured["H2D pinned 9.4MB"].value > measured["H2D pageable 9.4MB"].value * 0.5 > 0
    assert measured["GPU copy (read+write)"].value > 100
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
