"""Tiny random MoE checkpoints built offline with transformers' own classes and save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. Triton reads this when it is first imported,
# which transformers does below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers

from tiermoe.bench.synth_tokenizer import chatml_bpe

VOCAB = 320  # the 256 byte symbols, 5 ChatML special tokens and some merges
TOKENIZER = chatml_bpe(VOCAB)
EOS = TOKENIZER.convert_tokens_to_ids("<|im_end|>")


def hf_config(arch: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
        bos_token_id=None,
        pad_token_id=TOKENIZER.pad_token_id,
    )
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=32, head_dim=16)
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **common, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48
        )
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=8)
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=8)
    elif arch in ("deepseek_v2", "deepseek_v3"):
        mla = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
        moe = dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1)
        common["num_key_value_heads"] = common["num_attention_heads"]  # MLA: one latent for all heads
        if arch == "deepseek_v3":
            moe.update(n_group=1, topk_group=1)  # its defaults (8 groups, 4 kept) need 16 experts or more
        config = transformers.DeepseekV2Config if arch == "deepseek_v2" else transformers.DeepseekV3Config
        cfg = config(**common, **mla, **moe)
    elif arch == "gpt_oss":
        # Two layers of each kind, a window shorter than the prompts; head_dim as published (64 of 2880)
        cfg = transformers.GptOssConfig(
            **{**common, "num_hidden_layers": 4}, num_local_experts=8, head_dim=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )  # fmt: skip
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


MODEL_CLASSES = {
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "mixtral": transformers.MixtralForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
    "deepseek_v2": transformers.DeepseekV2ForCausalLM,
    "deepseek_v3": transformers.DeepseekV3ForCausalLM,
    "gpt_oss": transformers.GptOssForCausalLM,
}


def build_hf_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](hf_config(arch, **overrides)).eval()
    # transformers initialises routers to zero and norms to one; random values make routing and
    # norms actually matter, so a wrong expert or a skipped norm changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "router.bias")) or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(("bias", "sinks")):  # biases (transformers: zeros) and gpt-oss's sink logits
                p.normal_(0.0, 0.5 if name.endswith("sinks") else 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's bias on the choice alone
                b.uniform_(0.0, 0.5)
    model.generation_config.eos_token_id = EOS
    return model


def save(model, path: Path, layout: str = "per_expert", shard: str | None = None) -> Path:
    kwargs = {"save_original_format": layout == "per_expert"}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(path, **kwargs)
    TOKENIZER.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, layout="per_expert"|"fused", shard=None, **config overrides) -> (dir, hf model)."""
    made: dict = {}

    def make(arch: str, layout: str = "per_expert", shard: str | None = None, **overrides):
        key = (arch, layout, shard, json.dumps(overrides, sort_keys=True))
        if key not in made:
            model = build_hf_model(arch, **overrides)
            path = tmp_path_factory.mktemp(f"{arch}-{layout}")
            made[key] = (save(model, path, layout, shard), model)
        return made[key]

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def budget_gib(plan, experts: int) -> float:
    """A GPU budget in GiB holding a plan's dense weights and KV cache and `experts` expert slots."""
    return (plan.dense_bytes + plan.kv_bytes + experts * plan.expert_bytes) / 2**30


def runner_requests(llm, prompts: list[list[int]]):
    """Requests placed by hand (KV blocks, state rows): the runner runs them as given, without the
    scheduler or the engine's context checks. The caller releases them with release_requests."""
    from tiermoe.engine.request import SamplingParams
    from tiermoe.engine.scheduler import Request

    routing = llm.engine.runner.routing
    requests = []
    for slot, prompt in enumerate(prompts):
        r = Request(-1 - slot, list(prompt), SamplingParams(), slot=slot)
        if routing:
            r.doc = routing.begin_sequence(slot)
        requests.append(r)
    return requests


def run_chunks(llm, requests, counts: list[int]) -> torch.Tensor:
    """One runner step of `counts[i]` more tokens of each request (blocks grown to hold them)."""
    from tiermoe.engine.scheduler import Chunk

    chunks = []
    for r, n in zip(requests, counts, strict=True):
        assert llm.engine.pool.grow(r.blocks, r.num_computed + n), "test needs more KV blocks"
        chunks.append(Chunk(r, r.num_computed, n))
    logits = llm.engine.runner.execute(chunks)
    for r, n in zip(requests, counts, strict=True):
        r.num_computed += n
    return logits


def release_requests(llm, requests) -> None:
    for r in requests:
        llm.engine.pool.release(r.blocks)


def prompt_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """Logits [B, V] at each prompt's last token, the prompts run together as one step of the runner."""
    requests = runner_requests(llm, prompts)
    try:
        return run_chunks(llm, requests, [len(p) for p in prompts])
    finally:
        release_requests(llm, requests)


def runner_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens through the runner alone (no context check: past max_position_embeddings too)."""
    (r,) = requests = runner_requests(llm, [prompt])
    try:
        logits = run_chunks(llm, requests, [len(prompt)])
        while True:
            r.output_ids.append(int(logits[0].argmax()))
            if len(r.output_ids) == n:
                return r.output_ids
            logits = run_chunks(llm, requests, [1])
    finally:
        release_requests(llm, requests)
