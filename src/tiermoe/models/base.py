"""What every architecture file provides: its arguments (a dataclass read from the Hugging Face config),
how to build the module tree, and where its tensors live in a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..weights.checkpoint import ExpertNames
from .layers import Attention, AttentionSpec, CausalLM, DecoderBody, DecoderLayer, Rotary
from .moe import SoftmaxTopKRouter, SparseMoeBlock


@dataclass
class MoEArgs:
    """Fields every supported architecture has. Architecture files subclass this with their own extras."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rope_parameters: dict = field(default_factory=dict)
    moe_layers: list[int] = field(default_factory=list)

    @staticmethod
    def common(hf, num_experts: int, moe_intermediate_size: int, norm_topk_prob: bool) -> dict:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return dict(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            num_experts=num_experts,
            top_k=hf.num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size,
            norm_topk_prob=norm_topk_prob,
            rope_parameters=dict(rope_parameters(hf)),
        )

    def attention(self, layer: int, **features) -> Attention:
        """GQA attention of this model's sizes; features: bias, q/k norm, clipping, sliding window."""
        spec = AttentionSpec(
            self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.rms_norm_eps, **features
        )
        return Attention(spec, layer)

    def moe_block(self, layer: int, **shared) -> SparseMoeBlock:
        """A sparse MoE block with this model's softmax top-k router; shared: its shared expert, if any."""
        router = SoftmaxTopKRouter(self.hidden_size, self.num_experts, self.top_k, self.norm_topk_prob)
        return SparseMoeBlock(layer, router, **shared)

    def assemble(self, hf, layers: list[DecoderLayer]) -> CausalLM:
        body = DecoderBody(
            self.vocab_size, self.hidden_size, layers, self.rms_norm_eps, build_rotary(hf, self.head_dim)
        )
        return CausalLM(body, self.vocab_size, self.hidden_size, self.tie_word_embeddings)

    @property
    def expert_shape(self) -> tuple[int, int]:
        """(hidden, intermediate) of one expert."""
        return self.hidden_size, self.moe_intermediate_size

    def expert_numel(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size


def rope_parameters(hf) -> dict:
    """transformers 5 normalises rope_theta / rope_scaling into rope_parameters; older configs don't."""
    params = getattr(hf, "rope_parameters", None)
    if params:
        return params
    params = dict(getattr(hf, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    return params


def build_rotary(hf, head_dim: int) -> Rotary:
    params = rope_parameters(hf)
    rope_type = params.get("rope_type", "default")

    def compute() -> tuple[torch.Tensor, float]:
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
            return 1.0 / (params["rope_theta"] ** exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")

    return Rotary(compute)


@dataclass(frozen=True)
class Architecture:
    """A registry entry: Hugging Face `architectures` name -> how to read, build and load that model."""

    name: str
    args_from_hf: Callable[[object], MoEArgs]
    build: Callable[[MoEArgs, object], CausalLM]  # (args, hf config); the loader attaches the experts
    expert_names: ExpertNames
    renames: tuple[tuple[str, str], ...] = ()


def sparse_layers(hf, num_experts: int) -> list[int]:
    """Qwen-style layer selection: every decoder_sparse_step-th layer, minus mlp_only_layers."""
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    return [
        i for i in range(hf.num_hidden_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0
    ]
