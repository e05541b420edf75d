"""Parity with transformers: logits of a batched, left-padded prompt and 32 greedy tokens.

fp32 on CPU: relative error of the logits (||ours - ref|| / ||ref||) below 1e-4; only summation order
differs between the two implementations, which costs ~1e-6 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig

from tiermoe import LLM, SamplingParams
from tiermoe.errors import InvalidRequestError

from .conftest import prompt_logits

REL_TOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 7, 3 + 8, 120, 64], [9, 33, 200, 14]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' logits at the last position of each left-padded prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def our_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    return prompt_logits(llm, prompts)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


# DeepSeek-V3's YaRN settings (its factor is 40) over a tiny original context
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}
CASES = [
    ("qwen3_moe", "per_expert", {}),
    ("qwen3_moe", "fused", {}),
    ("qwen3_moe", "per_expert", {"norm_topk_prob": True}),
    ("qwen3_moe", "per_expert", {"mlp_only_layers": [1]}),
    ("qwen3_moe", "per_expert", {"decoder_sparse_step": 2}),
    ("qwen2_moe", "per_expert", {}),
    ("qwen2_moe", "fused", {"norm_topk_prob": True}),
    ("mixtral", "per_expert", {}),
    ("mixtral", "fused", {}),
    ("olmoe", "per_expert", {}),
    ("olmoe", "fused", {"norm_topk_prob": True}),
    ("deepseek_v2", "per_expert", {}),
    ("deepseek_v2", "fused", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    (
        "deepseek_v2",
        "per_expert",
        {"q_lora_rank": None, "routed_scaling_factor": 2.0},
    ),  # V2-Lite's plain q_proj
    ("deepseek_v3", "per_expert", {}),  # sigmoid, correction bias, 8 experts in 1 group
    ("deepseek_v3", "fused", {"n_group": 4, "topk_group": 2, "norm_topk_prob": False}),
    ("deepseek_v3", "per_expert", {"rope_interleave": False}),
    ("deepseek_v3", "per_expert", {"rope_parameters": YARN}),  # rotary and softmax scaled (mscale_all_dim)
    ("deepseek_v2", "per_expert", {"rope_parameters": {**YARN, "mscale": 0.707}}),  # an attention factor too
    ("deepseek_v3", "per_expert", {"rms_norm_eps": 0.05}),  # not the low-rank norms' epsilon
    ("gpt_oss", "fused", {}),  # [E, in, out] experts, gate and up interleaved, biases, sinks, windows
    ("gpt_oss", "fused", {"rope_parameters": {**YARN, "truncate": False}}),  # as published (factor 32)
    pytest.param(
        "gpt_oss",
        "fused",
        {"swiglu_limit": 0.5},  # a limit the activations cross
        marks=pytest.mark.skipif(
            not hasattr(GptOssConfig(), "swiglu_limit"),
            reason="this transformers has no swiglu_limit (it clamps at 7): the reference cannot take 0.5",
        ),
    ),
]


@pytest.mark.parametrize(("arch", "layout", "overrides"), CASES)
def test_logits_and_greedy_match_transformers(tiny_checkpoint, arch, layout, overrides):
    path, hf = tiny_checkpoint(arch, layout, **overrides)
    llm = LLM(path, device="cpu", dtype="fp32")
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < REL_TOL
    ours = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(hf, PROMPTS[0], 32)


def test_sharded_checkpoint_loads_and_matches(tiny_checkpoint):
    path, hf = tiny_checkpoint("qwen3_moe", "per_expert", shard="100KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    llm = LLM(path, device="cpu", dtype="fp32")
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < REL_TOL


def test_batched_generation_equals_one_by_one(tiny_checkpoint):
    path, _ = tiny_checkpoint("olmoe")
    llm = LLM(path, device="cpu", dtype="fp32")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(PROMPTS, params)]
    alone = [llm.generate(p, params)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_bf16_on_cpu_loads_bf16_weights_and_stays_close(tiny_checkpoint):
    """bf16 keeps 8 mantissa bits: two correct bf16 runs differ by ~1e-2; 3e-2 leaves room, a wrong
    routing or a skipped norm costs far more than that."""
    path, hf = tiny_checkpoint("qwen3_moe")
    llm = LLM(path, device="cpu", dtype="bf16")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert {t.dtype for bank in llm.provider.banks.values() for t in bank.values()} == {torch.bfloat16}
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 3e-2


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_fewer_experts_per_token_match_transformers_with_that_top_k(tiny_checkpoint, arch):
    path, _ = tiny_checkpoint(arch)
    _, hf_k1 = tiny_checkpoint(arch, num_experts_per_tok=1)  # the same weights (same seed), top-1 routing
    llm = LLM(path, device="cpu", dtype="fp32", experts_per_token=1)
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf_k1, PROMPTS)) < REL_TOL
    full = LLM(path, device="cpu", dtype="fp32")
    assert rel_err(our_logits(llm, PROMPTS), our_logits(full, PROMPTS)) > 0.01  # it did change the routing
    with pytest.raises(InvalidRequestError, match="routes to 2 experts a token; choose 1 to 2"):
        LLM(path, device="cpu", experts_per_token=3)
