"""What every architecture file provides: its arguments (a dataclass read from the Hugging Face config),
how to build the module tree, and where its tensors live in a checkpoint."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidRequestError
from .experts import SWIGLU, ExpertKind
from .layers import (
    Attention,
    AttentionSpec,
    CausalLM,
    DecoderBody,
    DecoderLayer,
    DynamicNTKRotary,
    LongRopeRotary,
    RMSNorm,
    Rotary,
)
from .moe import SoftmaxTopKRouter, SparseMoeBlock
from .names import ExpertNames


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
    # Multi-token prediction layers stored after the decoder's (DeepSeek-V3: num_nextn_predict_layers):
    # their tensors are recognised, not loaded (they serve speculative decoding only).
    mtp_layers: int = 0
    expert_kind: ExpertKind = SWIGLU  # what a routed expert computes: biases, the GLU

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

    def assemble(self, hf, layers: list[DecoderLayer], norm: type[RMSNorm] = RMSNorm) -> CausalLM:
        body = DecoderBody(
            self.vocab_size,
            self.hidden_size,
            layers,
            self.rms_norm_eps,
            build_rotary(hf, self.head_dim),
            norm,
        )
        return CausalLM(body, self.vocab_size, self.hidden_size, self.tie_word_embeddings)

    @property
    def rope_extends_context(self) -> bool:
        """Whether the rope scaling is made for contexts beyond max_position_embeddings: true for every
        scaled rope_type (linear, dynamic, yarn, llama3, longrope), false for plain "default" rotary."""
        return self.rope_parameters.get("rope_type", "default") != "default"

    @property
    def rope_max_len(self) -> int:
        """The longest context, in tokens, the rope parameters are valid for: for a scaled rope_type
        original_max_position_embeddings x factor where both are given, else max_position_embeddings;
        never less than max_position_embeddings (llama3 and longrope configs state the long one there)."""
        p = self.rope_parameters
        original, factor = p.get("original_max_position_embeddings"), p.get("factor")
        if not self.rope_extends_context or original is None or factor is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(original * factor))

    @property
    def expert_shape(self) -> tuple[int, int]:
        """(hidden, intermediate) of one expert."""
        return self.hidden_size, self.moe_intermediate_size

    def expert_numel(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def context_len(self, requested: int | None) -> int:
        """The context in tokens: `requested` (--max-model-len) or max_position_embeddings. Beyond
        max_position_embeddings only as far as the rope scaling was made for (YaRN and kin), else a
        clear error rather than a silent cut."""
        if requested is None:
            return self.max_position_embeddings
        if requested < 1:
            raise InvalidRequestError("max_model_len must be at least 1 token", "max_model_len")
        longest = self.rope_max_len
        if requested > longest:
            rope = self.rope_parameters.get("rope_type", "default")
            how = (
                "enable rope scaling (e.g. YaRN) in config.json to go further"
                if longest == self.max_position_embeddings
                else f"its {rope} rope scaling reaches {longest}"
            )
            raise InvalidRequestError(
                f"max_model_len {requested} is beyond this model's context of {self.max_position_embeddings} "
                f"tokens (max_position_embeddings; {how})",
                "max_model_len",
            )
        return requested


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")  # the rope_type values built here


def rope_parameters(hf) -> dict:
    """The config's rope parameters with `rope_type` and `rope_theta` set. transformers 5 normalises
    rope_theta / rope_scaling (legacy key `type` or `rope_type`) into rope_parameters, and checks each
    type's required fields as it reads config.json; older configs don't. Raises CheckpointError for a
    rope type tiermoe does not implement."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):  # as transformers' standardize_rope_params
        params.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
    if params["rope_type"] not in ROPE_TYPES:
        config = Path(getattr(hf, "name_or_path", "") or ".") / "config.json"
        raise CheckpointError(
            f"{config}: rope_type {params['rope_type']!r} (field rope_parameters.rope_type; rope_scaling.type "
            f"or rope_scaling.rope_type in older configs) is not supported; tiermoe supports "
            f"{', '.join(ROPE_TYPES)}"
        )
    return params


def build_rotary(hf, head_dim: int) -> Rotary:
    """The rotary embedding of the config's rope parameters. Scaled types run transformers' own rope
    functions (on the CPU, see Rotary.reset), so the frequencies are theirs to the bit."""
    params = rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type == "default":

        def default() -> tuple[torch.Tensor, float]:
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
            return 1.0 / (params["rope_theta"] ** exponents), 1.0

        return Rotary(default)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # transformers' yarn, dynamic and longrope read head_dim unguarded (None in a Mixtral config)
    config = copy.deepcopy(hf)
    config.head_dim = head_dim
    init = ROPE_INIT_FUNCTIONS[rope_type]
    if rope_type == "dynamic":
        # At load (seq_len = max_position_embeddings) these are the plain frequencies; they grow past it.
        theta, factor, original = params["rope_theta"], params["factor"], hf.max_position_embeddings
        return DynamicNTKRotary(lambda: init(config, "cpu"), theta, factor, original, head_dim)
    if rope_type == "longrope":
        original = params["original_max_position_embeddings"]

        def short_and_long() -> tuple[torch.Tensor, float]:
            short, scaling = init(config, "cpu")
            long, _ = init(config, "cpu", seq_len=original + 1)
            return torch.stack([short, long]), scaling

        return LongRopeRotary(short_and_long, original)
    return Rotary(lambda: init(config, "cpu"))


@dataclass(frozen=True)
class Architecture:
    """A registry entry: Hugging Face `architectures` name -> how to read, build and load that model."""

    name: str
    args_from_hf: Callable[[object], MoEArgs]
    build: Callable[[MoEArgs, object], CausalLM]  # (args, hf config); the loader attaches the experts
    expert_names: ExpertNames
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement): Hub tensor names -> ours, on reading
    hub_renames: tuple[tuple[str, str], ...] = ()  # ours -> the names save_pretrained writes

    def hub_name(self, name: str) -> str:
        """The name transformers' save_pretrained gives the tensor we call `name`."""
        for pattern, replacement in self.hub_renames:
            name = re.sub(pattern, replacement, name)
        return name


def sparse_layers(hf, num_experts: int) -> list[int]:
    """Qwen-style layer selection: every decoder_sparse_step-th layer, minus mlp_only_layers."""
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    return [
        i for i in range(hf.num_hidden_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0
    ]
