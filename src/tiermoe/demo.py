"""`tiermoe demo`: a small random-weight Qwen3-MoE checkpoint, written once to a cache folder, so a
newcomer sees the whole path (load, tokenize, chat template, generate, stats) with no download.

The architecture and file layout are real (Qwen3MoeForCausalLM, per-expert Hub tensor names, a
byte-level BPE tokenizer with the ChatML template); the weights are random, so the text is gibberish.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CORPUS = """tiermoe runs mixture of experts language models that do not fit in the memory of one graphics
card. The attention weights and the hottest experts stay on the GPU, the other experts wait in pinned
host memory or on the disk, and the engine moves each expert across the bus just before a layer needs
it. The router of the next layer guesses which experts come next, so their transfers start early.
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; : ' "
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tiermoe" / "demo-qwen3-moe-v1"


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (skipped when already complete)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer()
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


def build_tokenizer(vocab_size: int = DEMO_CONFIG["vocab_size"]):
    """A byte-level BPE trained on CORPUS in milliseconds, with ChatML special tokens and template."""
    from .bench.synth_tokenizer import STYLES, train_bpe, wrap

    tok = train_bpe([CORPUS] * 4, vocab_size, dict(enumerate(SPECIAL_TOKENS)), reserve=False)
    return wrap(tok, STYLES["chatml"])
