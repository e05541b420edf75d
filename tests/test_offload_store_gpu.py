"""The tiered store on CUDA: copies on the side stream with prefetch running concurrently with compute
give exactly the tokens of the all-resident run and of prefetch off."""

from __future__ import annotations

import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.offload.budget import GIB

from .test_offload_store import PROMPT

pytestmark = pytest.mark.gpu


def test_cuda_store_matches_resident_with_and_without_prefetch(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    resident = LLM(path, device="cuda", dtype="bf16", workspace_gib=0)
    plan = resident.plan
    budget = (plan.dense_bytes + plan.kv_bytes + 4 * 3 * plan.expert_bytes) / GIB
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
    assert type(llm.engine.runner._graphs[2]).__name__ == "LayeredDecodeGraph"
    stats = runs[True][0].stats.experts
    assert stats["prefetch_issued"] > 0 and stats["prefetch_hits"] > 0
