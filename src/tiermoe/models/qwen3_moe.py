"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA attention with per-head q/k RMSNorm, softmax top-k routing with
optional renormalisation, and dense layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Architecture, MoEArgs, sparse_layers
from .layers import MLP, CausalLM, DecoderLayer
from .names import ExpertNames


@dataclass
class Qwen3MoeArgs(MoEArgs):
    intermediate_size: int = 0  # dense layers
    attention_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf) -> Qwen3MoeArgs:
        num_experts = getattr(hf, "num_experts", None) or hf.num_local_experts
        args = cls(
            **MoEArgs.common(hf, num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)),
            intermediate_size=hf.intermediate_size,
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            sliding_window=hf.sliding_window if getattr(hf, "use_sliding_window", False) else None,
        )
        args.moe_layers = sparse_layers(hf, num_experts)
        return args


def build(args: Qwen3MoeArgs, hf) -> CausalLM:
    bias = args.attention_bias
    layers = [
        DecoderLayer(
            args.attention(i, qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=args.sliding_window),
            args.moe_block(i) if i in args.moe_layers else MLP(args.hidden_size, args.intermediate_size),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_layers)
    ]
    return args.assemble(hf, layers)


EXPERT_NAMES = ExpertNames(
    per_expert=tuple(
        f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
    fused=("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj"),
)

ARCH = Architecture("Qwen3MoeForCausalLM", Qwen3MoeArgs.from_hf, build, EXPERT_NAMES)
