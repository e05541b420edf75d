"""Experts generated in memory for checkpoints larger than the disk: seeded, the same on every read,
served identically by the resident provider and the tiered store."""

from __future__ import annotations

import torch

from tiermoe import LLM, SamplingParams
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.offload.sources import SyntheticExperts


def test_synthetic_experts_are_seeded_and_scaled():
    a = SyntheticExperts(seed=0, std=0.02, numel=30_000, device=torch.device("cpu"))
    x, y, z = torch.empty(30_000), torch.empty(30_000), torch.empty(30_000)
    a.read_into(3, 5, x)
    a.read_into(3, 5, y)
    a.read_into(3, 6, z)
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert abs(x.std().item() - 0.02) < 0.001


def test_checkpoint_without_expert_tensors_runs_resident_and_tiered(tmp_path):
    result = synth_checkpoint("tiny-qwen3-moe", tmp_path / "m", progress=False, experts_in_memory=True)
    assert result.num_tensors < 40  # dense tensors only: no per-expert names written
    resident = LLM(tmp_path / "m", device="cpu")
    plan = resident.plan
    budget = (plan.dense_bytes + plan.kv_bytes + 2 * 2 * plan.expert_bytes) / 2**30
    tiered = LLM(tmp_path / "m", device="cpu", gpu_budget_gib=budget + 1e-9)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    out = tiered.generate([1, 2, 3, 4], params)[0]
    assert out.token_ids == resident.generate([1, 2, 3, 4], params)[0].token_ids
    assert out.stats.experts["source"].startswith("synthetic experts (seed 0, std 0.02)")
    assert out.stats.experts["gpu_misses"] > 0
