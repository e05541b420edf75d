"""`tiermoe demo`: a small random-weight Qwen3-MoE checkpoint, written once to a cache folder, so a
newcomer sees the whole path (load, tokenize, chat template, generate, stats) with no download.

The architecture and file layout are real (Qwen3MoeForCausalLM, per-expert Hub tensor names, a
byte-level BPE tokenizer with the ChatML template); the weights are random, so the text is gibberish.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .bench.synth_tokenizer import chatml_bpe

DEMO_CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tiermoe" / "demo-qwen3-moe-v1"


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (skipped when already complete)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = chatml_bpe(DEMO_CONFIG["vocab_size"])
    config = Qwen3MoeConfig(
        **DEMO_CONFIG,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # transformers zero-inits routers; random ones make routing non-trivial
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = config.eos_token_id
    # Written beside the target and renamed, so an interrupted write never leaves a half checkpoint.
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(path)
    return path
