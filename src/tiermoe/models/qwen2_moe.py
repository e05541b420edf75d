"""Qwen2-MoE (Qwen2MoeForCausalLM): biased q/k/v projections, softmax top-k routing, and a shared
expert on every MoE layer scaled by its own sigmoid gate."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .base import Architecture, MoEArgs, sparse_layers
from .layers import MLP, CausalLM, DecoderLayer
from .qwen3_moe import EXPERT_NAMES


@dataclass
class Qwen2MoeArgs(MoEArgs):
    intermediate_size: int = 0  # dense layers
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = True
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer

    @classmethod
    def from_hf(cls, hf) -> Qwen2MoeArgs:
        types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        args = cls(
            **MoEArgs.common(hf, hf.num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)),
            intermediate_size=hf.intermediate_size,
            shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
            qkv_bias=bool(getattr(hf, "qkv_bias", True)),
            sliding_windows=[hf.sliding_window if t == "sliding_attention" else None for t in types],
        )
        args.moe_layers = sparse_layers(hf, hf.num_experts)
        return args


def build(args: Qwen2MoeArgs, hf) -> CausalLM:
    layers = []
    for i in range(args.num_layers):
        if i in args.moe_layers:
            shared = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            gate = nn.Linear(args.hidden_size, 1, bias=False)
            mlp = args.moe_block(i, shared_expert=shared, shared_expert_gate=gate)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size)
        attn = args.attention(i, qkv_bias=args.qkv_bias, sliding_window=args.sliding_windows[i])
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return args.assemble(hf, layers)


ARCH = Architecture("Qwen2MoeForCausalLM", Qwen2MoeArgs.from_hf, build, EXPERT_NAMES)
