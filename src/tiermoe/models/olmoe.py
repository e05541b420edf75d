"""OLMoE (OlmoeForCausalLM): q/k RMSNorm over all heads (not per head), optional q/k/v clipping,
softmax top-k routing without renormalisation by default."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Architecture, MoEArgs
from .layers import CausalLM, DecoderLayer
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
    bias = args.attention_bias
    layers = [
        DecoderLayer(
            args.attention(i, qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=args.clip_qkv),
            args.moe_block(i),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_layers)
    ]
    return args.assemble(hf, layers)


ARCH = Architecture("OlmoeForCausalLM", OlmoeArgs.from_hf, build, EXPERT_NAMES)
