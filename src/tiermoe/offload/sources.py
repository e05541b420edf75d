"""Where experts come from before any cache holds them: the checkpoint on disk, or a seeded generator.

The generator stands in for disk when a real-shaped checkpoint is larger than the machine's disk
(the Qwen3-30B-A3B benchmark: 58 GB of bf16 experts on a 64 GB disk); such checkpoints say so in
config.json under `tiermoe_synthetic_experts` and every figure measured with them says so too.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..formats.base import ExpertFormat
from ..weights.checkpoint import SYNTHETIC_KEY
from .disk import ExpertReader


class ExpertSource(Protocol):
    description: str

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Fill out (uint8 [format.nbytes]) with the expert in the model's expert format; return the bytes
        read from disk."""
        ...


class SyntheticExperts:
    """Seeded random experts, about normal(0, std), the same for a (seed, layer, expert) on one device
    (drawn on `device`, the GPU when there is one: 57 GiB of Qwen3 experts take minutes on the CPU)."""

    def __init__(self, seed: int, std: float, fmt: ExpertFormat, device: torch.device):
        self.seed, self.std, self.format = seed, std, fmt
        self.device = device
        self.description = (
            f"synthetic experts (seed {seed}, std {std}), generated in memory, not read from disk"
        )

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + layer * 10_007 + expert)
        self.format.fill_random(out, g, self.std)
        return 0


def open_expert_source(source) -> ExpertSource:
    """The expert source of a ModelSource (weights/loader.py)."""
    args = source.args
    synthetic = source.checkpoint.config.get(SYNTHETIC_KEY)
    if synthetic:
        return SyntheticExperts(
            int(synthetic.get("seed", 0)),
            float(synthetic.get("std", 0.02)),
            source.format,
            source.device,
        )
    return ExpertReader(
        source.checkpoint, source.format, source.arch.expert_names, args.moe_layers, args.num_experts
    )
