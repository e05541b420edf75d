"""The interface between the MoE block and wherever experts live, and the all-resident provider.

A provider runs the routed experts of one layer for a batch of tokens. Keeping compute behind this
interface lets the tiered store decide per expert where it runs (GPU slot, CPU) and in what order,
and lets quantized kernels plug in, without the model files changing.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .expert_compute import expert_mlp


class ExpertProvider(Protocol):
    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids and weights [T, k] -> sum_k weights * expert_ids(x), [T, H]."""
        ...

    def stats(self) -> dict:
        """Cumulative statistics since the last reset_stats()."""
        ...

    def reset_stats(self) -> None: ...


class ResidentExperts:
    """Every expert of every layer stacked on one device: gate_up [E, 2I, H], down [E, H, I] per layer."""

    def __init__(self, banks: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.banks = banks

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.banks[layer]
        return expert_mlp(x, ids, weights, gate_up, down)

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bank in self.banks.values() for t in bank)


def load_resident(source, progress=None) -> ResidentExperts:
    """Read every expert of every MoE layer into stacked banks on source.device (no offload)."""
    args, ckpt, names = source.args, source.checkpoint, source.arch.expert_names
    hidden, inter = args.expert_shape
    task = progress.add_task("experts", total=len(args.moe_layers)) if progress else None
    banks = {}
    for layer in args.moe_layers:
        gate_up = torch.empty(args.num_experts, 2 * inter, hidden, dtype=source.dtype, device=source.device)
        down = torch.empty(args.num_experts, hidden, inter, dtype=source.dtype, device=source.device)
        for e in range(args.num_experts):
            gu, d = ckpt.expert(names, layer, e, (hidden, inter))
            gate_up[e].copy_(gu)
            down[e].copy_(d)
        banks[layer] = (gate_up, down)
        if progress:
            progress.advance(task)
    return ResidentExperts(banks)
