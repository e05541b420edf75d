"""The memory plan holds: made before any weight is allocated, its KV reserve is the one cache the runner
allocates, and an unset max_tokens resolves to what the context and the reserve allow."""

from __future__ import annotations

import re

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.errors import InvalidRequestError
from tiermoe.models.kv_cache import cache_slots
from tiermoe.offload import budget
from tiermoe.offload.budget import GIB, plan_memory
from tiermoe.offload.placement import warn_below_top_k
from tiermoe.weights import loader

PROMPT = [5, 9, 12, 7, 3, 88, 41]


def _kv_bytes(llm: LLM) -> int:
    """Bytes of the runner's KV cache."""
    return llm.engine.runner.kv.nbytes()


@pytest.fixture(scope="module")
def long_context(tiny_checkpoint):
    """A tiny Qwen3-MoE whose config claims a 40,960-token context, as Qwen3's does."""
    return tiny_checkpoint("qwen3_moe", max_position_embeddings=40960)[0]


def test_default_reserve_is_capped_and_counted_per_layer(long_context):
    llm = LLM(long_context, device="cpu")
    per_token = 3 * 2 * 2 * 16 * 4  # layers x K and V x kv heads x head_dim x fp32
    assert llm.max_model_len == 40960
    # 4096 tokens in 256 blocks, and the null block
    assert (llm.plan.kv_tokens, llm.plan.kv_bytes) == (4096, (4096 + 16) * per_token)
    assert llm.model.kv_bytes_per_token(4) == per_token


def test_no_max_tokens_runs_to_the_reserve_and_never_past_it(long_context):
    llm = LLM(long_context, device="cpu", kv_reserve_tokens=48)
    assert _kv_bytes(llm) == llm.plan.kv_bytes  # the whole cache, allocated once as the plan says
    out = llm.generate(PROMPT, SamplingParams(ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (48 - len(PROMPT), "length")
    # Two sequences that each fill the reserve take turns (the second waits, or is preempted and
    # recomputes): each still runs to the reserve's end, and the cache never grows.
    outs = llm.generate([PROMPT, PROMPT[:3]], SamplingParams(ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [48 - len(PROMPT), 48 - 3]
    assert _kv_bytes(llm) == llm.plan.kv_bytes


def test_a_request_beyond_the_reserve_names_the_limit(long_context):
    llm = LLM(long_context, device="cpu", kv_reserve_tokens=48)
    with pytest.raises(InvalidRequestError, match="KV cache reserve holds 48 tokens") as info:
        llm.generate(PROMPT, SamplingParams(max_tokens=42))
    assert info.value.param == "max_tokens" and "--kv-reserve-tokens" in str(info.value)
    assert not llm.engine.has_unfinished()  # refused before it was queued
    assert len(llm.generate(PROMPT, SamplingParams(max_tokens=41, ignore_eos=True))[0].token_ids) == 41


def test_default_budget_counts_the_dense_weights_once(tiny_checkpoint, monkeypatch):
    """The default budget is the free memory before loading: a fake free figure that drops by the
    dense bytes once they are loaded must not be read after that drop."""
    path, _ = tiny_checkpoint("qwen3_moe")
    free = {"bytes": GIB + 1_000_000}
    load_dense = loader.load_dense

    def loading(model, source, progress):
        load_dense(model, source, progress)
        free["bytes"] -= model.dense_bytes()

    monkeypatch.setattr(loader, "load_dense", loading)
    monkeypatch.setattr(budget, "default_gpu_budget", lambda device: free["bytes"] - GIB)
    llm = LLM(path, device="cpu")
    p = llm.plan
    assert p.budget_bytes == 1_000_000
    assert p.gpu_slots == (1_000_000 - p.dense_bytes - p.kv_bytes - p.workspace_bytes) // p.expert_bytes
    assert 0 < p.gpu_slots < p.total_experts and free["bytes"] == GIB + 1_000_000 - p.dense_bytes


def test_plan_arithmetic():
    plan = plan_memory(
        moe_layers=[0, 1, 2], num_experts=8, top_k=2, expert_bytes=1000, dense_bytes=5000, kv_bytes=3000,
        workspace_bytes=1000, device=torch.device("cpu"), gpu_budget_gib=20_500 / GIB, cpu_budget_gib=1e-5,
        kv_tokens=30,
    )  # fmt: skip
    assert plan.gpu_slots == 11 and plan.quotas == {0: 4, 1: 4, 2: 3}  # (20500 - 9000) // 1000, spread
    assert plan.host_slots == int(1e-5 * GIB) // 1000 and not plan.all_resident
    line = plan.describe()
    assert (
        "KV cache 30 tokens" in line and "11 of 24 expert slots" in line and "host cache 10 experts" in line
    )


def test_generate_prints_the_plan_line(tiny_checkpoint, capsys):
    path, _ = tiny_checkpoint("qwen3_moe")
    assert (
        main(["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", "2"])
        == 0
    )
    err = capsys.readouterr().err
    assert "memory plan (GPU budget uncapped): dense" in err and "KV cache 512 tokens" in err


def test_max_model_len_beyond_the_model_is_refused(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    with pytest.raises(InvalidRequestError, match="beyond this model's context of 512") as info:
        LLM(path, device="cpu", max_model_len=1024)
    assert info.value.param == "max_model_len"
    assert LLM(path, device="cpu", max_model_len=100).max_model_len == 100


def test_max_model_len_reaches_as_far_as_yarn_was_made_for(tiny_checkpoint):
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "rope_theta": 10000.0,
    }
    path, _ = tiny_checkpoint("qwen3_moe", rope_parameters=yarn)
    llm = LLM(path, device="cpu", max_model_len=2048)
    assert llm.max_model_len == 2048 and llm.plan.kv_tokens == 2048
    with pytest.raises(InvalidRequestError, match="its yarn rope scaling reaches 2048"):
        LLM(path, device="cpu", max_model_len=2049)


def test_fewer_slots_than_top_k_a_layer_warns_with_what_would_give_top_k(caplog):
    """A plan whose KV reserve leaves a layer fewer slots than top-k warns, naming the budget and the KV
    reserve that would give every layer top-k slots; each of those, planned as the engine plans (the KV in
    whole blocks and the null block), gives them and warns no more. Over a range of budgets."""
    expert, per_token = 3 << 20, 64 << 10

    def plan(budget_gib: float, kv_tokens: int):
        return plan_memory(
            moe_layers=list(range(16)), num_experts=64, top_k=8, expert_bytes=expert, dense_bytes=GIB,
            kv_bytes=cache_slots(kv_tokens) * per_token, kv_tokens=kv_tokens, workspace_bytes=GIB // 2,
            device=torch.device("cpu"), gpu_budget_gib=budget_gib, cpu_budget_gib=8,
        )  # fmt: skip

    warned = 0
    for cap in (2.25, 2.27, 2.3, 2.32, 2.35, 2.37, 2.4, 2.45):  # top-k from 2.38 GiB
        low = plan(cap, 8192)
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_below_top_k(low, 8)
        if min(low.quotas.values()) >= 8:
            assert not caplog.records
            continue
        warned += 1
        (record,) = caplog.records
        assert "fewer than top-k 8" in record.message
        found = re.search(r"--gpu-budget of ([\d.]+) GiB(?:, or --kv-reserve-tokens (\d+))?", record.message)
        fixes = [plan(float(found[1]), 8192)] + ([plan(cap, int(found[2]))] if found[2] else [])
        assert found[2] or cap == 2.25  # the reserve suggested wherever some reserve fits
        for fixed in fixes:
            assert min(fixed.quotas.values()) >= 8, (cap, found.groups())
            caplog.clear()
            with caplog.at_level("WARNING"):
                warn_below_top_k(fixed, 8)
            assert not caplog.records
    assert warned == 6


def test_the_below_top_k_warning_comes_at_load_not_from_every_plan(tiny_checkpoint, caplog):
    """LLM warns once when it loads a plan with fewer slots than top-k; planning alone (the planner's
    candidates, the bench's floors) does not."""
    from tiermoe.config import EngineConfig
    from tiermoe.offload.placement import plan_from_config

    path, model = tiny_checkpoint("qwen3_moe", num_experts_per_tok=4)
    resident = LLM(path, device="cpu")
    budget = (resident.plan.dense_bytes + resident.plan.kv_bytes + 3 * 3 * resident.plan.expert_bytes) / GIB
    with caplog.at_level("WARNING"):
        plan_from_config(model.config.to_dict(), EngineConfig(device="cpu", gpu_budget_gib=budget))
        assert not [r for r in caplog.records if "top-k" in r.message]
        llm = LLM(path, device="cpu", gpu_budget_gib=budget)
    assert min(llm.plan.quotas.values()) == 3
    assert len([r for r in caplog.records if "fewer than top-k 4" in r.message]) == 1


def test_miss_path_auto_stages_where_it_can_run_and_copies_elsewhere():
    """auto: staged on a CUDA device for a format with decode kernels, every expert in the host cache and
    the workspace holding 16 experts, without cpu_compute; copy as soon as one of those is missing; an
    explicit path stands."""
    from types import SimpleNamespace

    from tiermoe.config import EngineConfig
    from tiermoe.offload.placement import miss_path_for

    def plan(workspace_experts=16, host_gib=1.0):
        return plan_memory(
            moe_layers=[0, 1, 2], num_experts=8, top_k=2, expert_bytes=1000, dense_bytes=5000,
            kv_bytes=3000, workspace_bytes=workspace_experts * 1000, device=torch.device("cpu"),
            gpu_budget_gib=(8000 + workspace_experts * 1000 + 11_000) / GIB, cpu_budget_gib=host_gib,
        )  # fmt: skip

    def source(device="cuda", kernels="dense"):
        return SimpleNamespace(
            device=torch.device(device),
            format=SimpleNamespace(kernels=kernels, name="dense", nbytes=1000),
            args=SimpleNamespace(num_experts=8),
        )

    auto = EngineConfig()
    assert auto.miss_path == "auto"
    assert miss_path_for(auto, plan(), source()) == "staged"
    assert miss_path_for(auto, plan(), source(device="cpu")) == "copy"
    assert miss_path_for(auto, plan(), source(kernels=None)) == "copy"
    assert miss_path_for(auto, plan(workspace_experts=15), source()) == "copy"
    assert miss_path_for(auto, plan(host_gib=20_000 / GIB), source()) == "copy"  # 20 of 24 experts
    assert miss_path_for(EngineConfig(cpu_compute=True), plan(), source()) == "copy"
    assert miss_path_for(EngineConfig(miss_path="in-place"), plan(), source(device="cpu")) == "in-place"
