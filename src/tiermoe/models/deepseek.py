"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM) and DeepSeek-V3 / R1 (DeepseekV3ForCausalLM): multi-head
latent attention (models/mla.py), the first `first_k_dense_replace` layers dense, then routed experts
beside always-on shared experts.

Routing, as transformers does it. V2: softmax scores, top-k (`greedy`) or top-k within the `topk_group`
groups of highest maximum score (`group_limited_greedy`), weights the chosen scores x
routed_scaling_factor (transformers' V2 never renormalises them, whatever norm_topk_prob says). V3:
sigmoid scores; the choice adds `e_score_correction_bias` and keeps the `topk_group` groups whose two
best scores sum highest; the weights are the chosen experts' plain scores, renormalised where
norm_topk_prob, x routed_scaling_factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Architecture, MoEArgs
from .layers import MLP, CausalLM, DecoderLayer
from .mla import MLASpec, MLAttention
from .moe import RoutingOverride, SparseMoeBlock
from .qwen3_moe import EXPERT_NAMES


def yarn_mscale(rope: dict) -> float:
    """DeepSeek's YaRN factor on the attention logits' scale (its square multiplies the softmax scale):
    0.1 x mscale_all_dim x ln(factor) + 1 for a scaled rope, 1 otherwise (transformers' yarn_get_mscale)."""
    factor, m = rope.get("factor", 1.0), rope.get("mscale_all_dim", 0)
    if rope.get("rope_type", "default") == "default" or not m or factor <= 1:
        return 1.0
    return 0.1 * m * math.log(factor) + 1.0


class GroupLimitedRouter(nn.Module):
    """DeepSeek's router: scores in float32, an optional bias and group limit on the choice only."""

    # As transformers keeps them: in bf16 a correction bias moves enough to change the chosen experts.
    FLOAT32_PARAMETERS = ("weight", "e_score_correction_bias")

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        scoring: str,  # "softmax" (V2) or "sigmoid" (V3, with the correction bias and top-2 group scores)
        groups: int,  # 1: no group limit
        topk_group: int,
        norm_topk_prob: bool,
        scaling: float,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        v3 = scoring == "sigmoid"
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts)) if v3 else None
        self.top_k, self.scoring, self.groups, self.topk_group = top_k, scoring, groups, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling

    def forward(
        self, x: torch.Tensor, routing: RoutingOverride | None = None, layer: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()  # [T, E]
        if routing is not None:
            ids = routing.route(layer, scores)
        else:
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            if self.groups > 1:
                grouped = choice.view(choice.shape[0], self.groups, -1)  # [T, groups, E / groups]
                # A group's score: its best expert's (V2) or its two best summed (V3). The dropped groups
                # are filled with 0 (V2: scores are positive) or -inf (V3: biased ones may not be).
                if self.scoring == "softmax":
                    best, fill = grouped.max(-1).values, 0.0
                else:
                    best, fill = grouped.topk(2, -1)[0].sum(-1), float("-inf")
                kept = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0).bool()
                choice = grouped.masked_fill(~kept[..., None], fill).flatten(1)
            ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(x.dtype), ids


@dataclass
class DeepseekArgs(MoEArgs):
    intermediate_size: int = 0  # the dense layers'
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    scoring: str = "softmax"
    groups: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    interleaved_rope: bool = True

    @classmethod
    def from_hf(cls, hf) -> DeepseekArgs:
        v3 = hf.model_type == "deepseek_v3"
        limited = v3 or getattr(hf, "topk_method", "greedy") == "group_limited_greedy"
        args = cls(
            # transformers' V2 ignores norm_topk_prob; its V3 applies it
            **MoEArgs.common(
                hf, hf.n_routed_experts, hf.moe_intermediate_size, v3 and bool(hf.norm_topk_prob)
            ),
            intermediate_size=hf.intermediate_size,
            q_lora_rank=hf.q_lora_rank,
            kv_lora_rank=hf.kv_lora_rank,
            qk_nope_head_dim=hf.qk_nope_head_dim,
            qk_rope_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            n_shared_experts=hf.n_shared_experts or 0,
            first_k_dense_replace=hf.first_k_dense_replace,
            scoring="sigmoid" if v3 else "softmax",
            groups=(hf.n_group or 1) if limited else 1,
            topk_group=(hf.topk_group or 1) if limited else 1,
            routed_scaling_factor=hf.routed_scaling_factor,
            attention_bias=bool(hf.attention_bias),
            interleaved_rope=bool(getattr(hf, "rope_interleave", True)),
        )
        args.head_dim = hf.qk_rope_head_dim  # the rotary's dimensions
        args.mtp_layers = getattr(hf, "num_nextn_predict_layers", 0) or 0
        args.moe_layers = [i for i in range(hf.num_hidden_layers) if i >= hf.first_k_dense_replace]
        return args

    def mla(self) -> MLASpec:
        # YaRN scales the softmax as well (mscale_all_dim), not only the rotary dimensions
        scale = (
            yarn_mscale(self.rope_parameters) ** 2 * (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        )
        return MLASpec(
            self.hidden_size, self.num_heads, self.q_lora_rank, self.kv_lora_rank, self.qk_nope_head_dim,
            self.qk_rope_head_dim, self.v_head_dim, scale, self.attention_bias,
            self.interleaved_rope,
        )  # fmt: skip

    def router(self) -> GroupLimitedRouter:
        return GroupLimitedRouter(
            self.hidden_size, self.num_experts, self.top_k, self.scoring, self.groups, self.topk_group,
            self.norm_topk_prob, self.routed_scaling_factor,
        )  # fmt: skip


def build(args: DeepseekArgs, hf) -> CausalLM:
    spec, layers = args.mla(), []
    for i in range(args.num_layers):
        if i in args.moe_layers:
            shared = args.n_shared_experts * args.moe_intermediate_size
            mlp = SparseMoeBlock(
                i, args.router(), shared_expert=MLP(args.hidden_size, shared) if shared else None
            )
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size)
        layers.append(DecoderLayer(MLAttention(spec, i), mlp, args.hidden_size, args.rms_norm_eps))
    return args.assemble(hf, layers)


# Ours is SparseMoeBlock's one `shared_expert`: DeepSeek's `shared_experts` are one MLP n_shared_experts wide.
RENAMES = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)
HUB_RENAMES = ((r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),)
V2 = Architecture("DeepseekV2ForCausalLM", DeepseekArgs.from_hf, build, EXPERT_NAMES, RENAMES, HUB_RENAMES)
V3 = Architecture("DeepseekV3ForCausalLM", DeepseekArgs.from_hf, build, EXPERT_NAMES, RENAMES, HUB_RENAMES)
