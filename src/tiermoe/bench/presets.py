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
    tokenizer: str | None = (
        None  # style in bench/synth_tokenizer.py: qwen, chatml, olmo, mistral, deepseek, harmony
    )


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

_DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# DeepSeek-V3's config (its FP8 checkpoint's quantization_config aside: synth --experts fp8 writes the
# experts that way), its multi-token prediction layer dropped (synth writes none).
_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 0,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# openai/gpt-oss-20b without its quantization_config: the published experts are MXFP4, which
# `tiermoe synth --experts mxfp4 --experts-in-memory` recreates (written to disk, synth's experts are bf16).
_GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
_GPT_OSS_GENERATION = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}

# Layers of the truncated V3 preset: its 3 dense layers and 4 MoE layers, 45 GB of FP8 experts, which the
# GPU machine's 128 GB of RAM holds; per-layer costs of the 58 MoE layers of the real model scale from it.
DEEPSEEK_V3_LAYERS = 7


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
        Preset(
            "deepseek-v2-lite",
            "deepseek-ai/DeepSeek-V2-Lite",
            _DEEPSEEK_V2_LITE,
            {"bos_token_id": 100000, "eos_token_id": 100001},
            tokenizer="deepseek",
        ),
        Preset(
            "deepseek-v3-7l",
            "deepseek-ai/DeepSeek-V3 (its first 7 layers)",
            {**_DEEPSEEK_V3, "num_hidden_layers": DEEPSEEK_V3_LAYERS},
            {"bos_token_id": 0, "eos_token_id": 1},
            tokenizer="deepseek",
        ),
        Preset("gpt-oss-20b", "openai/gpt-oss-20b", _GPT_OSS_20B, _GPT_OSS_GENERATION, tokenizer="harmony"),
        Preset(
            "gpt-oss-120b",
            "openai/gpt-oss-120b",
            {
                **_GPT_OSS_20B,
                "num_hidden_layers": 36,
                "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18,
            },
            _GPT_OSS_GENERATION,
            tokenizer="harmony",
        ),
        Preset(
            "tiny-gpt-oss",
            "tiermoe",
            _tiny(
                _GPT_OSS_20B,
                num_hidden_layers=4,
                layer_types=["sliding_attention", "full_attention"] * 2,
                head_dim=16,
                num_local_experts=8,
                num_experts_per_tok=2,
                experts_per_token=2,
                intermediate_size=64,
                sliding_window=8,
                rope_scaling={**_GPT_OSS_20B["rope_scaling"], "original_max_position_embeddings": 16},
            ),
            tokenizer="harmony",
        ),
        Preset(
            "tiny-deepseek-v2",
            "tiermoe",
            _tiny(
                _DEEPSEEK_V2_LITE,
                num_key_value_heads=4,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                moe_intermediate_size=32,
                intermediate_size=128,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                rope_scaling={**_DEEPSEEK_V2_LITE["rope_scaling"], "original_max_position_embeddings": 128},
                max_position_embeddings=128 * 40,  # YaRN's factor 40 over the original context, as published
                pad_token_id=None,
            ),
            tokenizer="deepseek",
        ),
        Preset(
            "tiny-deepseek-v3",
            "tiermoe",
            _tiny(
                _DEEPSEEK_V3,
                num_hidden_layers=3,
                num_key_value_heads=4,
                first_k_dense_replace=1,
                n_routed_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                intermediate_size=128,
                q_lora_rank=24,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                n_group=4,
                topk_group=2,
                rope_scaling={**_DEEPSEEK_V3["rope_scaling"], "original_max_position_embeddings": 128},
                max_position_embeddings=128 * 40,  # YaRN's factor 40 over the original context, as published
                pad_token_id=None,
            ),
            tokenizer="deepseek",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called `name` (a deep copy, so callers may edit its config)."""
    if name not in PRESETS:
        raise InvalidRequestError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}", param="preset"
        )
    return copy.deepcopy(PRESETS[name])
