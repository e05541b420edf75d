"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over all heads (not per head), optional q/k/v clipping,
softmax top-k routing without renormalisation by default."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Architecture, MoEArgs, build_rotary
from .layers import Attention, AttentionSpec, CausalLM, DecoderBody, DecoderLayer
from .moe import SoftmaxTopKRouter, SparseMoeBlock
from .qwen3_moe import EXPERT_NAMES


@dataclass
class OlmoeArgs(MoEArgs):
    clip_qkv: float | None = None
    attention_bias: bool = False

    @classmethod
    def from_hf(cls, hf) -> OlmoeArgs:
        args = cls(
            **MoEArgs.common(hf, hf.num_experts, hf.intermediate_size, bool(hf.norm_topk_prob)),
            clip_qkv=getattr(hf, "clip_qkv", None),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
        )
        args.moe_layers = list(range(hf.num_hidden_layers))
        return args


def build(args: OlmoeArgs, hf) -> CausalLM:
    spec = AttentionSpec(
        args.hidden_size,
        args.num_heads,
        args.num_kv_heads,
        args.head_dim,
        args.rms_norm_eps,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="full",
        clip_qkv=args.clip_qkv,
    )
    layers = [
        DecoderLayer(
            Attention(spec, i),
            SparseMoeBlock(
                i, SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.top_k, args.norm_topk_prob)
            ),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_layers)
    ]
    body = DecoderBody(
        args.vocab_size, args.hidden_size, layers, args.rms_norm_eps, build_rotary(hf, args.head_dim)
    )
    return CausalLM(body, args.vocab_size, args.hidden_size, args.tie_word_embeddings)


ARCH = Architecture("OlmoeForCausalLM", OlmoeArgs.from_hf, build, EXPERT_NAMES)
