"""Experts generated in memory for checkpoints larger than the disk: seeded, the same on every read,
served identically by the resident provider and the tiered store."""

from __future__ import annotations

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.errors import InvalidRequestError
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.fp4 import Nvfp4Format
from tiermoe.formats.fp8 import Fp8BlockFormat
from tiermoe.formats.int4 import Int4Format
from tiermoe.formats.mxfp4 import Mxfp4Format
from tiermoe.offload.sources import SyntheticExperts

from .conftest import budget_gib


def test_synthetic_experts_are_seeded_and_scaled():
    fmt = DenseFormat(100, 100, torch.float32)
    a = SyntheticExperts(seed=0, std=0.02, fmt=fmt, device=torch.device("cpu"))
    bank = fmt.empty(3)
    for row, expert in enumerate((5, 5, 6)):
        a.read_into(3, expert, bank[row])
    x, y, z = torch.cat([v.flatten(1) for v in fmt.views(bank).values()], dim=1)  # the values, no padding
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert abs(x.std().item() - 0.02) < 0.001


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt",
    [
        DenseFormat(256, 128, torch.bfloat16),
        Int4Format(256, 128, torch.bfloat16, group=128),
        Fp8BlockFormat(256, 128, torch.bfloat16),
        Nvfp4Format(256, 128, torch.bfloat16),
        Mxfp4Format(256, 128, torch.bfloat16),
    ],
    ids=["bf16", "int4", "fp8", "nvfp4", "mxfp4"],
)
def test_synthetic_experts_drawn_on_the_gpu_fill_pinned_host_memory(fmt):
    """The engine's case for Qwen3-sized checkpoints: the generator on the GPU, the host cache pinned."""
    source = SyntheticExperts(seed=1, std=0.02, fmt=fmt, device=torch.device("cuda"))
    host, gpu = fmt.empty(1, pin_memory=True), fmt.empty(1, device="cuda")
    source.read_into(2, 7, host[0])
    source.read_into(2, 7, gpu[0])
    # The parts' values only: the alignment padding between parts is never written (garbage differs).
    for name, values in fmt.views(host).items():
        assert values.any() and torch.equal(values, fmt.views(gpu)[name].cpu()), name


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


@pytest.mark.parametrize(
    ("experts", "name"),
    [
        ("int4", "int4 (gptq, group 32)"),
        ("fp8", "fp8 (e4m3, 128x128 block scales)"),
        ("nvfp4", "nvfp4 (e2m1, e4m3 scales per 16)"),
        ("mxfp4", "mxfp4 (e2m1, e8m0 scales per 32)"),
    ],
)
def test_quantized_experts_generated_in_memory(tmp_path, experts, name):
    result = synth_checkpoint(
        "tiny-qwen3-moe", tmp_path / "m", progress=False, experts_in_memory=True, experts=experts
    )
    llm = LLM(result.out_dir, device="cpu")
    plan = llm.plan
    tiered = LLM(
        result.out_dir,
        device="cpu",
        gpu_budget_gib=budget_gib(plan, 4 * 2),
    )
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = tiered.generate([1, 2, 3, 4], params)[0]
    assert out.token_ids == llm.generate([1, 2, 3, 4], params)[0].token_ids
    assert out.stats.experts["format"] == name and llm.source.format.nbytes == plan.expert_bytes
    with pytest.raises(InvalidRequestError, match="then run tiermoe convert"):
        synth_checkpoint("tiny-qwen3-moe", tmp_path / "d", progress=False, experts=experts)
