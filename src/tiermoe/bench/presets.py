"""Model shapes synth can write: the published config.json of real MoE models, and tiny ones for tests.

The published configs are copied field for field from the Hub (including legacy fields such as
rope_theta that transformers still reads), so a synthetic checkpoint has the same tensor shapes,
routing and attention layout as the real model; only the weight values are random.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # Hub repository the config comes from, or "tiermoe" for made-up test shapes
    config: dict
    generation_config: dict = field(default_factory=dict)
    tokenizer: str | None = None  # style in bench/synth_tokenizer.py: qwen, chatml, olmo or mistral


_OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "model_type": "olmoe",
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 50304,
}

_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def _tiny(published: dict, **overrides) -> dict:
    """A published config shrunk to a few layers of hidden 64, 8 experts and a 512-token vocabulary.
    Special-token ids sit at 0-2; overrides drop those the published model lacks (OLMoE has no bos,
    Mixtral no pad) or share them as it does (Qwen: bos = pad = <|endoftext|>)."""
    config = copy.deepcopy(published)
    config.update(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    config.update(overrides)
    return config


_TINY_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 32,
    "norm_topk_prob": False,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 64,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "olmoe-1b-7b",
            "allenai/OLMoE-1B-7B-0924",
            _OLMOE_1B_7B,
            {"eos_token_id": 50279, "pad_token_id": 1},
            tokenizer="olmo",
        ),
        Preset(
            "qwen3-30b-a3b",
            "Qwen/Qwen3-30B-A3B",
            _QWEN3_30B_A3B,
            {
                "bos_token_id": 151643,
                "do_sample": True,
                "eos_token_id": [151645, 151643],
                "pad_token_id": 151643,
                "temperature": 0.6,
                "top_k": 20,
                "top_p": 0.95,
            },
            tokenizer="qwen",
        ),
        Preset(
            "mixtral-8x7b",
            "mistralai/Mixtral-8x7B-v0.1",
            _MIXTRAL_8X7B,
            {"bos_token_id": 1, "eos_token_id": 2},
            tokenizer="mistral",
        ),
        Preset(
            "tiny-qwen3-moe",
            "tiermoe",
            _tiny(
                _QWEN3_30B_A3B,
                head_dim=16,
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                intermediate_size=128,
                max_window_layers=2,
                bos_token_id=0,
            ),
            tokenizer="chatml",
        ),
        Preset(
            "tiny-olmoe",
            "tiermoe",
            _tiny(
                _OLMOE_1B_7B, num_experts=8, num_experts_per_tok=2, intermediate_size=32, bos_token_id=None
            ),
            tokenizer="olmo",
        ),
        Preset(
            "tiny-mixtral",
            "tiermoe",
            _tiny(
                _MIXTRAL_8X7B,
                num_local_experts=8,
                num_experts_per_tok=2,
                intermediate_size=32,
                pad_token_id=None,
            ),
            tokenizer="mistral",
        ),
        Preset("tiny-qwen2-moe", "tiermoe", _tiny(_TINY_QWEN2_MOE, bos_token_id=0), tokenizer="chatml"),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called `name` (a deep copy, so callers may edit its config)."""
    if name not in PRESETS:
        raise InvalidRequestError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}", param="preset"
        )
    return copy.deepcopy(PRESETS[name])
