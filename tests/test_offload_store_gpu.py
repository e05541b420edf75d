"""The tiered store on CUDA: copies on the side stream with prefetch running concurrently with compute
give exactly the tokens of the all-resident run and of prefetch off."""

from __future__ import annotations

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.engine.runner import MIN_BLOCKS
from tiermoe.errors import InvalidRequestError
from tiermoe.formats.swiglu import GATHER_MAX_PAIRS

from .conftest import budget_gib
from .test_offload_store import PROMPT, assert_table_follows

pytestmark = pytest.mark.gpu


def test_cuda_store_matches_resident_with_and_without_prefetch(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    resident = LLM(path, device="cuda", dtype="bf16", workspace_gib=0)
    budget = budget_gib(resident.plan, 4 * 3)
    expected = resident.generate(PROMPT, params)[0].token_ids
    runs = {}
    for prefetch in (True, False):
        llm = LLM(
            path, device="cuda", dtype="bf16", workspace_gib=0, gpu_budget_gib=budget, prefetch=prefetch
        )
        assert len(llm.provider.pool) == 12
        assert llm.provider.host.chunks[0].is_pinned()
        runs[prefetch] = llm.generate([PROMPT, PROMPT[:4]], params)
        assert runs[prefetch][0].token_ids == expected
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    eager = LLM(path, device="cuda", dtype="bf16", workspace_gib=0, gpu_budget_gib=budget, cuda_graphs=False)
    assert [o.token_ids for o in eager.generate([PROMPT, PROMPT[:4]], params)] == [
        o.token_ids for o in runs[True]
    ]
    assert type(llm.engine.runner._graphs[(2, MIN_BLOCKS)]).__name__ == "LayeredDecodeGraph"
    stats = runs[True][0].stats.experts
    assert stats["prefetch_issued"] > 0 and stats["prefetch_hits"] > 0


@pytest.mark.parametrize("miss_path", ["in-place", "staged"])
def test_in_place_misses_on_cuda_match_resident_in_one_graph_with_a_tiny_pool(tiny_checkpoint, miss_path):
    """miss_path in-place: the whole decode step is one CUDA graph; missed experts are read from pinned
    host memory by the expert kernels while admissions copy others into the two slots a layer has, on the
    side stream, as fast as the steps come (a copy that overwrote a slot a step still read would change
    the tokens); or staged, copied by a kernel into victim slots the step itself chooses on the GPU (the
    table and the owners it changes, read back by the host after the step, must stay consistent)."""
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    resident = LLM(path, device="cuda", dtype="bf16", workspace_gib=0)
    budget = budget_gib(resident.plan, 4 * 2)
    prompts = [PROMPT, PROMPT[:4]]
    expected = [o.token_ids for o in resident.generate(prompts, params)]
    workspace = GATHER_MAX_PAIRS * resident.plan.expert_bytes / 2**30  # the staging buffer
    llm = LLM(
        path,
        device="cuda",
        dtype="bf16",
        workspace_gib=workspace,
        gpu_budget_gib=budget + workspace,
        miss_path=miss_path,
    )
    staged = miss_path == "staged"
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == expected
    assert type(llm.engine.runner._graphs[(2, MIN_BLOCKS)]).__name__ == "DecodeGraph"
    d = out[0].stats.experts_decode
    assert d["gpu_hits"] > 0 and d["gpu_misses"] > 0 and d["bytes_in_place"] > 0
    assert (d["bytes_h2d"] == 0) == staged  # staged, the admission is the staging copy
    assert_table_follows(llm.provider)
    assert [o.token_ids for o in llm.generate(prompts[:1], params)] == expected[:1]  # batch 1 after batch 2


def test_staged_misses_without_room_in_the_workspace_are_refused_with_the_room_they_need(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    resident = LLM(path, device="cuda", dtype="bf16", workspace_gib=0)
    budget = budget_gib(resident.plan, 4 * 2)
    with pytest.raises(InvalidRequestError, match=r"raise --workspace to 0\.0\d GiB"):
        LLM(path, device="cuda", dtype="bf16", workspace_gib=0, gpu_budget_gib=budget, miss_path="staged")


def test_misses_computed_on_the_cpu_beside_copies_match_resident(tiny_checkpoint):
    """cpu_compute on CUDA: the hidden states reach the host with the routed ids, the CPU's share runs
    while the copies fly, its sum is added to the GPU's. fp32, so the two devices' sums agree closely
    enough for greedy tokens to match."""
    from tiermoe.offload.cpu_compute import MissCosts

    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    resident = LLM(path, device="cuda", dtype="fp32", workspace_gib=0)
    budget = budget_gib(resident.plan, 4 * 3)
    expected = resident.generate(PROMPT, params)[0].token_ids
    llm = LLM(path, device="cuda", dtype="fp32", workspace_gib=0, gpu_budget_gib=budget, cpu_compute=True)
    assert llm.provider.cpu_costs.stream_s > 0  # measured at load on this machine
    llm.provider.cpu_costs = MissCosts(stream_s=1e-3, cpu_s=1e-4, cpu_token_s=1e-5, cpu_layer_s=1e-5)
    out = llm.generate(PROMPT, params)[0]
    assert out.token_ids == expected
    assert out.stats.experts_decode["cpu_computed"] > 0
