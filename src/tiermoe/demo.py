"""`tiermoe demo`'s checkpoints, both real Hugging Face ones with no download:

- the trained demo MoE shipped in the package (data/demo-moe: a Qwen3-MoE of 14.5M parameters, 32 experts
  top-4, trained by scripts/train_demo.py on Shakespeare's plays and Python's standard library; its
  training log, routing report and held-out text are in docs/demo-model/), the default;
- a small random-weight Qwen3-MoE written once to a cache folder (`tiermoe demo --random`): the same path
  (load, tokenize, chat template, generate, stats) for offload exercises, where the text is gibberish.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

SHIPPED = Path(__file__).resolve().parent / "data" / "demo-moe"
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")

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
RANDOM_TOKENIZER_IDS = 1024  # the BPE's target size; the vocabulary is what it reaches


def shipped_checkpoint() -> Path:
    """The trained demo model's folder inside the installed package."""
    missing = [name for name in SHIPPED_FILES if not (SHIPPED / name).is_file()]
    if missing:
        raise CheckpointError(
            f"the demo model is missing from the installed package ({', '.join(missing)} not in {SHIPPED}); "
            "reinstall tiermoe, or run `tiermoe demo --random`"
        )
    return SHIPPED


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tiermoe" / "demo-qwen3-moe-v2"


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the random-weight demo checkpoint to `path` (skipped when already complete)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .bench.synth_tokenizer import chatml_bpe

    tokenizer = chatml_bpe(RANDOM_TOKENIZER_IDS)
    config = Qwen3MoeConfig(
        **RANDOM_CONFIG,
        vocab_size=len(tokenizer),  # every id the model can sample decodes to text
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
