"""The two halves the runner's layered CUDA graphs run a MoE layer in (dense part captured, routed
experts eager) compute exactly the layer's own forward, shared expert included."""

from __future__ import annotations

import pytest
import torch

from tiermoe import LLM
from tiermoe.models.kv_cache import BLOCK_TOKENS, KVBatch
from tiermoe.models.moe import SparseMoeBlock


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])  # qwen2_moe: a gated shared expert
def test_before_and_after_experts_equal_the_layer(tiny_checkpoint, arch):
    path, _ = tiny_checkpoint(arch)
    llm = LLM(path, device="cpu")
    cache, model = llm.engine.runner.kv, llm.model
    layer = next(m for m in model.model.layers if isinstance(m.mlp, SparseMoeBlock))
    ids = torch.tensor([[3, 17, 42, 7, 99]])
    positions = torch.arange(5)[None]
    outs = []
    for split in (False, True):
        cache.bind(KVBatch(torch.tensor([[1]]), positions + BLOCK_TOKENS, positions, torch.tensor([5])))
        x, rope = model.embed(ids, positions)
        with torch.inference_mode():
            if split:
                x1, xn, weights, expert_ids, shared = layer.before_experts(x, rope, cache)
                assert shared is None if arch == "qwen3_moe" else shared is not None
                routed = llm.provider.forward(layer.mlp.layer_idx, xn, expert_ids, weights)
                outs.append(layer.after_experts(x1, routed, shared, out=torch.empty_like(x1)))
            else:
                outs.append(layer(x, rope, cache))
    assert outs[0].abs().sum() > 0
    assert torch.equal(outs[0], outs[1])
