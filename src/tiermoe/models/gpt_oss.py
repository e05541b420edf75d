"""gpt-oss (GptOssForCausalLM): GQA attention with biases and a learned sink logit per head, sliding
window (128 tokens) and full attention alternating by `layer_types`, YaRN rotary, RMSNorms that scale in
float32, and a router with a bias whose top-k logits are softmaxed among themselves.

The experts have biases on both projections and a clamped GLU (models/experts.py); their gate and up rows
alternate in the checkpoint, and the bf16 layout transformers writes is [E, in, out] (ExpertNames). The
published checkpoints keep them in MXFP4 (formats/mxfp4.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Architecture, MoEArgs
from .experts import ExpertKind
from .layers import CausalLM, DecoderLayer, Float32ScaleRMSNorm
from .moe import RoutingOverride, SparseMoeBlock
from .names import ExpertNames

SWIGLU_ALPHA = 1.702  # transformers' default where config.json has no swiglu_alpha (the published ones don't)
SWIGLU_LIMIT = 7.0  # the published value; older transformers (5.17) have no swiglu_limit and clamp at 7


class BiasedTopKRouter(nn.Module):
    """Logits with a bias, top-k of the logits, softmax over those k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.top_k = top_k

    def forward(
        self, x: torch.Tensor, routing: RoutingOverride | None = None, layer: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k]). An override sees the softmax over
        every expert; the weights are still the softmax over the chosen experts' logits."""
        logits = F.linear(x, self.weight, self.bias)  # [T, E], in x's dtype as transformers computes it
        if routing is None:
            top, ids = torch.topk(logits, self.top_k, dim=-1)
        else:
            ids = routing.route(layer, logits.float().softmax(dim=-1))
            top = logits.gather(-1, ids)
        return F.softmax(top, dim=-1, dtype=top.dtype), ids


@dataclass
class GptOssArgs(MoEArgs):
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer
    attention_bias: bool = True

    @classmethod
    def from_hf(cls, hf) -> GptOssArgs:
        types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        args = cls(
            **MoEArgs.common(hf, hf.num_local_experts, hf.intermediate_size, True),
            attention_bias=bool(getattr(hf, "attention_bias", True)),
            sliding_windows=[hf.sliding_window if t == "sliding_attention" else None for t in types],
        )
        args.moe_layers = list(range(hf.num_hidden_layers))
        alpha = getattr(hf, "swiglu_alpha", None) or SWIGLU_ALPHA
        args.expert_kind = ExpertKind(
            bias=True, limit=float(getattr(hf, "swiglu_limit", None) or SWIGLU_LIMIT), alpha=float(alpha)
        )
        return args


def build(args: GptOssArgs, hf) -> CausalLM:
    layers = []
    for i in range(args.num_layers):
        bias = args.attention_bias
        attn = args.attention(
            i, qkv_bias=bias, o_bias=bias, sliding_window=args.sliding_windows[i], sinks=True
        )
        router = BiasedTopKRouter(args.hidden_size, args.num_experts, args.top_k)
        mlp = SparseMoeBlock(i, router)
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps, Float32ScaleRMSNorm))
    return args.assemble(hf, layers, Float32ScaleRMSNorm)


EXPERTS = "model.layers.{layer}.mlp.experts"
EXPERT_NAMES = ExpertNames(
    per_expert=tuple(f"{EXPERTS}.{{expert}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    fused=(f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"),
    fused_bias=(f"{EXPERTS}.gate_up_proj_bias", f"{EXPERTS}.down_proj_bias"),
    fused_in_out=True,
    interleaved=True,
)
# Ours is SparseMoeBlock's `gate`; gpt-oss calls its router `router`.
RENAMES = ((r"\.mlp\.router\.", ".mlp.gate."),)
HUB_RENAMES = ((r"\.mlp\.gate\.", ".mlp.router."),)
ARCH = Architecture("GptOssForCausalLM", GptOssArgs.from_hf, build, EXPERT_NAMES, RENAMES, HUB_RENAMES)
