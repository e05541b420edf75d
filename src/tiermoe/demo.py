"""`tiermoe demo`'s checkpoints, with no download.

The default is the trained demo MoE shipped in the package (data/demo-moe, docs/demo-model.md): a
14.5M-parameter Qwen3-MoE with 32 experts (top-4) in each of its 4 layers, trained by
scripts/train_demo.py on Shakespeare's plays and Python's standard library, so it writes text that reads
like either. `--random` writes a random-weight checkpoint of the same family to a cache folder instead:
gibberish, but a real file layout for trying the offload flags on.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .bench.synth_tokenizer import chatml_bpe
from .config import user_cache_dir

# The random checkpoint's shape; its vocabulary is the tokenizer's own size, so every id it samples prints.
RANDOM_CONFIG = dict(
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
RANDOM_TOKENIZER_MERGES = 1024  # the merge budget of chatml_bpe; training on its small corpus stops sooner


def trained_checkpoint() -> Path:
    """The shipped demo model's folder (package data: on disk wherever the package is installed)."""
    return Path(str(resources.files("tiermoe") / "data" / "demo-moe"))


def random_cache_dir() -> Path:
    return user_cache_dir() / "demo-qwen3-moe-random-v2"


def write_random_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the random-weight demo checkpoint to `path` (skipped when already complete)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = chatml_bpe(RANDOM_TOKENIZER_MERGES)
    config = Qwen3MoeConfig(
        **RANDOM_CONFIG,
        vocab_size=len(tokenizer),
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
