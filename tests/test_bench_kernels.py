"""The kernel bench's measurement on the CPU (the GPU run is `python -m tiermoe.bench.kernels`): it runs
each format's decode path and its error against the float32 reference is the format's, not the bench's."""

from __future__ import annotations

import pytest
import torch

from tiermoe.bench.kernels import measure
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.int4 import Int4Format


def test_measure_reports_bytes_speed_and_error():
    dense = measure(DenseFormat(128, 64, torch.float32), 4, device="cpu", iters=3)
    int4 = measure(Int4Format(128, 64, torch.float32, 32), 4, device="cpu", iters=3)
    assert (
        dense["bytes_read"] == 4 * 3 * 128 * 64 * 4
        and int4["bytes_read"] == 4 * Int4Format(128, 64, torch.float32, 32).nbytes
    )
    assert dense["rel_error"] < 1e-6 and int4["rel_error"] < 1e-5  # the same computation in float32
    assert dense["gb_s"] > 0 and int4["ms_per_layer"] > 0


def test_sweep_tries_launches_from_the_rule_and_keeps_the_fastest(monkeypatch):
    """In Triton's interpreter on the CPU: every launch it times gave the rule's outputs (it raises
    otherwise), none breaks the format's constraints, and the best is the fastest it tried."""
    pytest.importorskip("triton")
    from tiermoe.bench import kernels

    monkeypatch.setattr(kernels, "SLOTS", 4)
    monkeypatch.setattr(kernels, "SWEEP_AXES", {"split": (1, 2, 8), "block_k": (16, 32)})
    fmt = Int4Format(64, 32, torch.float32, 16)
    device = (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # the interpreter runs kernels on CPU tensors only
    r = kernels.sweep_projection(fmt, "gate_up", pairs=2, device=device, iters=1)
    assert (r["k"], r["n"], r["m"], r["bytes_read"]) == (
        64,
        32,
        2,
        2 * (64 // 8 * 32 * 4 + 4 * 32 // 8 * 4 + 4 * 32 * 2) * 2,
    )
    tried = {(t["split"], t["block_k"]) for t in r["tried"]}
    # split 8 of K = 64 leaves 8 inputs a program, below block_k 16; block_k 32 is beyond the group of 16.
    # The rule's own launch is tried too: on a GPU it splits to fill the SMs, so it may add one more.
    assert {(1, 16), (2, 16)} <= tried and (r["rule"]["split"], r["rule"]["block_k"]) in tried
    assert all(block_k == 16 and 64 // split >= block_k for split, block_k in tried)
    assert r["best_us"] == min(t["us"] for t in r["tried"])


def dequantized(q, scales, zeros):
    """A linear of the weights the int4 values stand for, in the input's dtype: the harness's own check."""
    w = (q.float() - zeros.float().repeat_interleave(128, 1)) * scales.float().repeat_interleave(128, 1)
    return lambda x: x @ w.to(x.dtype).T


def test_int4_peer_layer_step_matches_its_float32_reference():
    from tiermoe.bench import int4_peers

    step, reference = int4_peers.layer_step(dequantized, 256, 128, 2, device="cpu")
    rel = ((step() - reference).norm() / reference.norm()).item()
    assert 1e-4 < rel < 1e-2  # bf16 inputs and weights against float32: close, not equal


@pytest.mark.gpu
def test_torch_tinygemm_peer_computes_the_same_step():
    """The packing and zero convention we hand torch's tinygemm kernel give our weights."""
    from tiermoe.bench import int4_peers

    step, reference = int4_peers.layer_step(int4_peers.tinygemm, 2048, 768, 8)
    assert ((step() - reference).norm() / reference.norm()).item() < 1e-2
