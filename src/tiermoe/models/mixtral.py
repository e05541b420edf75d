"""Mixtral (MixtralForCausalLM): every layer sparse, softmax top-k always renormalised, optional sliding
window. Hub checkpoints name the MoE block `block_sparse_moe` and the expert matrices w1 (gate),
w3 (up), w2 (down)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Architecture, MoEArgs
from .layers import CausalLM, DecoderLayer
from .names import ExpertNames


@dataclass
class MixtralArgs(MoEArgs):
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf) -> MixtralArgs:
        args = cls(
            **MoEArgs.common(hf, hf.num_local_experts, hf.intermediate_size, norm_topk_prob=True),
            sliding_window=getattr(hf, "sliding_window", None),
        )
        args.moe_layers = list(range(hf.num_hidden_layers))
        return args


def build(args: MixtralArgs, hf) -> CausalLM:
    layers = [
        DecoderLayer(
            args.attention(i, sliding_window=args.sliding_window),
            args.moe_block(i),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for i in range(args.num_layers)
    ]
    return args.assemble(hf, layers)


EXPERT_NAMES = ExpertNames(
    per_expert=tuple(f"model.layers.{{layer}}.mlp.experts.{{expert}}.{w}.weight" for w in ("w1", "w3", "w2")),
    fused=("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj"),
)

ARCH = Architecture(
    "MixtralForCausalLM",
    MixtralArgs.from_hf,
    build,
    EXPERT_NAMES,
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
    hub_renames=((r"\.mlp\.", ".block_sparse_moe."),),  # every Mixtral layer is sparse
)
