"""Routing on CUDA: every mode gives the same tokens and the same recorded routing under CUDA-graph
decode (whole-step graphs for resident experts, layered graphs for the store) as eagerly."""

from __future__ import annotations

import numpy as np
import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.offload.budget import GIB
from tiermoe.routing.trace import load_trace

from .test_routing_engine import PROMPT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("store", ["resident", "capped", "capped-prefetch"])
@pytest.mark.parametrize("mode", ["natural", "uniform", "szd", "trace"])
def test_graph_decode_routes_as_eager(tiny_checkpoint, tmp_path, mode, store):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    base = dict(device="cuda", dtype="bf16", workspace_gib=0)
    if store != "resident":
        plan = LLM(path, **base).plan
        base["gpu_budget_gib"] = (plan.dense_bytes + plan.kv_bytes + 4 * 3 * plan.expert_bytes) / GIB
        # with prefetch, the predictor (emulated, or the router's lookahead) runs between layered graphs
        base["prefetch"] = store == "capped-prefetch"
    routing = mode
    if mode == "trace":
        LLM(path, **base, routing="szd", record_routing=str(tmp_path / "szd.npz")).generate(
            [PROMPT, PROMPT[:4]], params
        )
        routing = f"trace:{tmp_path / 'szd.npz'}"
    runs = {}
    for graphs in (True, False):
        llm = LLM(
            path, **base, routing=routing, cuda_graphs=graphs, record_routing=str(tmp_path / f"{graphs}.npz")
        )
        runs[graphs] = [o.token_ids for o in llm.generate([PROMPT, PROMPT[:4]], params)]
        runs[graphs] += [o.token_ids for o in llm.generate([PROMPT[2:], PROMPT[:7]], params)]  # graph reused
        if graphs:
            assert llm.engine.runner._graphs, "decode was not captured"
    assert runs[True] == runs[False]
    a, b = load_trace(tmp_path / "True.npz"), load_trace(tmp_path / "False.npz")
    assert np.array_equal(a.step, b.step)
    differ = np.flatnonzero((a.experts != b.experts).any(axis=1))
    first = differ[:3].tolist()
    assert not len(differ), (
        f"{len(differ)} of {len(a.experts)} rows differ; first (seq, token, layer, prefill, step, graph ids, eager ids): "
        + str(
            [
                (a.seq[i], a.token[i], a.layer[i], a.prefill[i], a.step[i], a.experts[i], b.experts[i])
                for i in first
            ]
        )
    )
