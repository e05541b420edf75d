"""DeepSeek's multi-head latent attention: the cache holds latents, and the model runs through the
tiered expert store like the others. (Parity with transformers: test_models.py's DeepSeek cases.)"""

from __future__ import annotations

import torch

from tiermoe import LLM, SamplingParams
from tiermoe.models.kv_cache import cache_slots

from .conftest import budget_gib

PROMPT = [5, 17, 42, 99, 7, 11, 120, 64]
RANK, ROPE, LAYERS = 16, 8, 3  # conftest's tiny DeepSeek


def test_the_cache_stores_latents_not_expanded_keys_and_values(tiny_checkpoint):
    path, hf = tiny_checkpoint("deepseek_v3")
    llm = LLM(path, device="cpu", dtype="fp32")
    per_token = (RANK + ROPE) * LAYERS * 4  # (kv_lora_rank + qk_rope_head_dim) x layers x fp32
    assert llm.model.kv_bytes_per_token(4) == per_token
    expanded = 2 * hf.config.num_attention_heads * (8 + ROPE) * LAYERS * 4  # K and V of 4 heads
    assert per_token < expanded / 5
    assert llm.engine.runner.kv.nbytes() == cache_slots(llm.plan.kv_tokens) * per_token == llm.plan.kv_bytes


def test_deepseek_through_the_tiered_store_gives_the_resident_tokens(tiny_checkpoint):
    """Two of a layer's eight experts on the 'GPU', the rest streamed: the same greedy tokens, with the
    shared expert and the dense first layer resident."""
    path, _ = tiny_checkpoint("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    resident = LLM(path, device="cpu", dtype="fp32")
    llm = LLM(path, device="cpu", dtype="fp32", gpu_budget_gib=budget_gib(resident.plan, 2 * 2))
    out = llm.generate(PROMPT, params)[0]
    assert out.token_ids == resident.generate(PROMPT, params)[0].token_ids
    e = out.stats.experts
    assert e["gpu_slots"] == 4 and e["gpu_misses"] > 0  # two MoE layers, two slots each


def test_multi_token_prediction_layers_are_recognised_not_rejected(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints store num_nextn_predict_layers MTP layers after the decoder's: they load
    (the weights stay on disk); a tensor of a layer beyond those is still an error."""
    import json
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    from tiermoe.errors import CheckpointError

    path, _ = tiny_checkpoint("deepseek_v3")
    # (layer, with its eh_proj): an MTP layer; one beyond num_nextn_predict_layers; a decoder layer too many
    for extra, eh_proj, ok in ((LAYERS, True, True), (LAYERS + 1, True, False), (LAYERS, False, False)):
        out = tmp_path / f"mtp-{extra}-{eh_proj}"
        shutil.copytree(path, out)
        tensors = load_file(out / "model.safetensors")
        if eh_proj:
            tensors[f"model.layers.{extra}.eh_proj.weight"] = torch.zeros(64, 128)
        tensors[f"model.layers.{extra}.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
        if ok:
            llm = LLM(out, device="cpu", dtype="fp32")
            assert llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].token_ids
        else:
            with pytest.raises(CheckpointError, match=f"model.layers.{extra}.(eh_proj|mlp)"):
                LLM(out, device="cpu", dtype="fp32")


def test_the_router_stays_float32_in_a_bf16_model(tiny_checkpoint):
    """As transformers keeps it: a correction bias rounded to bf16 changes which experts are chosen."""
    from safetensors.torch import load_file

    path, _ = tiny_checkpoint("deepseek_v3")
    llm = LLM(path, device="cpu", dtype="bf16")
    gate = llm.model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    stored = load_file(path / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(gate.e_score_correction_bias, stored.float())
    assert llm.model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16


def test_a_prompt_chunk_expands_the_cache_a_group_of_heads_at_a_time(tiny_checkpoint, monkeypatch):
    """The expansion bounded to one head at a time gives the logits of all heads at once."""
    from tiermoe.models import mla

    from .conftest import prompt_logits

    path, _ = tiny_checkpoint("deepseek_v2")
    llm = LLM(path, device="cpu", dtype="fp32")
    whole = prompt_logits(llm, [PROMPT])
    monkeypatch.setattr(mla, "EXPAND_BYTES", 1)  # one head a group
    assert torch.allclose(prompt_logits(llm, [PROMPT]), whole, rtol=1e-5, atol=1e-6)
