"""Where experts come from before any cache holds them: the checkpoint on disk, or a seeded generator.

The generator stands in for disk when a real-shaped checkpoint is larger than the machine's disk
(the Qwen3-30B-A3B benchmark: 58 GB of bf16 experts on a 64 GB disk); such checkpoints say so in
config.json under `tiermoe_synthetic_experts` and every figure measured with them says so too.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..weights.checkpoint import SYNTHETIC_KEY
from .disk import ExpertReader


class ExpertSource(Protocol):
    description: str

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Fill out ([3*H*I], compute dtype) with [gate_up (2I x H), down (H x I)]; return bytes read."""
        ...


class SyntheticExperts:
    """Seeded random experts, normal(0, std), the same for a (seed, layer, expert) on any device."""

    def __init__(self, seed: int, std: float, numel: int, device: torch.device):
        self.seed, self.std, self.numel = seed, std, numel
        self.device = device
        self.description = (
            f"synthetic experts (seed {seed}, std {std}), generated in memory, not read from disk"
        )

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + layer * 10_007 + expert)
        values = torch.randn(self.numel, generator=g, device=self.device, dtype=torch.float32) * self.std
        out.copy_(values)
        return 0


def open_expert_source(source) -> ExpertSource:
    """The expert source of a ModelSource (weights/loader.py)."""
    args = source.args
    synthetic = source.checkpoint.config.get(SYNTHETIC_KEY)
    if synthetic:
        return SyntheticExperts(
            int(synthetic.get("seed", 0)),
            float(synthetic.get("std", 0.02)),
            args.expert_numel(),
            source.device,
        )
    return ExpertReader(
        source.checkpoint, source.arch.expert_names, args.moe_layers, args.num_experts, args.expert_shape
    )


def bank_views(flat: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a flat expert bank [S, 3*H*I] as gate_up [S, 2I, H] and down [S, H, I]."""
    s = flat.shape[0]
    return flat[:, : 2 * inter * hidden].view(s, 2 * inter, hidden), flat[:, 2 * inter * hidden :].view(
        s, hidden, inter
    )
