"""Tensor names and shapes of a Hugging Face MoE checkpoint, computed from its config.json alone, as the
model files declare them: the dense parameters of the module tree built on the meta device and each MoE
layer's per-expert tensors (the architecture's ExpertNames), named as `save_pretrained` writes them.
So synth can write a checkpoint layer by layer and the bench can count expert bytes without opening
the weights, and an architecture is described once, in its model file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.registry import from_config

BYTES_PER_DTYPE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint. init: "normal" (weights), "ones" (norms) or "zeros" (biases)."""

    name: str
    shape: tuple[int, ...]
    init: str
    is_expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def bytes_per_element(config: dict) -> int:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return BYTES_PER_DTYPE[str(dtype).removeprefix("torch.")]


def _init(name: str) -> str:
    """How synth fills a tensor: norms with ones, biases with zeros, every weight matrix at random."""
    return "ones" if name.endswith("norm.weight") else "zeros" if name.endswith(".bias") else "normal"


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint in layer order (embeddings, each decoder layer with its experts,
    final norm, lm_head unless tied)."""
    arch, hf, args = from_config(config)
    with torch.device("meta"):
        model = arch.build(args, hf)
    hidden, inter = args.expert_shape
    expert_shapes = ((inter, hidden), (inter, hidden), (hidden, inter))  # gate, up, down

    def experts(layer: int) -> list[TensorSpec]:
        names = arch.expert_names
        if names.fused_in_out:  # gpt-oss: transformers reads only its fused [E, in, out] layout, with biases
            e = args.num_experts
            (gate_up, down), (gate_up_bias, down_bias) = names.fused, names.fused_bias
            return [
                TensorSpec(arch.hub_name(name.format(layer=layer)), shape, init, is_expert=True)
                for name, shape, init in (
                    (gate_up, (e, hidden, 2 * inter), "normal"),
                    (gate_up_bias, (e, 2 * inter), "zeros"),
                    (down, (e, inter, hidden), "normal"),
                    (down_bias, (e, hidden), "zeros"),
                )
            ]
        return [
            TensorSpec(arch.hub_name(name.format(layer=layer, expert=e)), shape, "normal", is_expert=True)
            for e in range(args.num_experts)
            for name, shape in zip(names.per_expert, expert_shapes, strict=True)
        ]

    specs, current = [], None
    for name, param in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if current is not None and layer != current and current in args.moe_layers:
            specs += experts(current)
        current = layer
        specs.append(TensorSpec(arch.hub_name(name), tuple(param.shape), _init(name)))
    return specs


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of a checkpoint split into routed experts (offloadable) and everything else (resident)."""

    expert_bytes: int
    dense_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.dense_bytes


def checkpoint_size(config: dict) -> CheckpointSize:
    per = bytes_per_element(config)
    expert = dense = 0
    for spec in tensor_specs(config):
        if spec.is_expert:
            expert += spec.numel * per
        else:
            dense += spec.numel * per
    return CheckpointSize(expert, dense)


def expert_bytes_per_token(config: dict) -> int:
    """Bytes of routed-expert weights one token reads: top-k experts in every MoE layer."""
    _, _, args = from_config(config)
    return args.top_k * len(args.moe_layers) * args.expert_numel() * bytes_per_element(config)
