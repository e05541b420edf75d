"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA attention with per-head q/k RMSNorm, softmax top-k routing with
optional renormalisation, and dense layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from dataclasses import dataclass

from ..weights.checkpoint import ExpertNames
from .base import Architecture, MoEArgs, build_rotary, sparse_layers
from .layers import MLP, Attention, AttentionSpec, CausalLM, DecoderBody, DecoderLayer
from .moe import SoftmaxTopKRouter, SparseMoeBlock


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
    spec = AttentionSpec(
        args.hidden_size,
        args.num_heads,
        args.num_kv_heads,
        args.head_dim,
        args.rms_norm_eps,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="head",
        sliding_window=args.sliding_window,
    )
    layers = []
    for i in range(args.num_layers):
        if i in args.moe_layers:
            router = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.top_k, args.norm_topk_prob)
            mlp = SparseMoeBlock(i, router)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size)
        layers.append(DecoderLayer(Attention(spec, i), mlp, args.hidden_size, args.rms_norm_eps))
    body = DecoderBody(
        args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, build_rotary(hf, args.head_dim)
    )
    return CausalLM(body, args.vocab_size, args.hidden_size, args.tie_word_embeddings)


EXPERT_NAMES = ExpertNames(
    per_expert=tuple(
        f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
    fused=("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj"),
)

ARCH = Architecture("Qwen3MoeForCausalLM", Qwen3MoeArgs.from_hf, build, EXPERT_NAMES)
