"""The interface between the MoE block and wherever experts live, and the all-resident provider.

A provider runs the routed experts of one layer for a batch of tokens. Keeping compute behind this
interface lets the tiered store decide per expert where it runs (GPU slot, CPU) and in what order,
and lets quantized kernels plug in, without the model files changing.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..models.moe import Experts
from .expert_compute import GATHER_MAX_PAIRS, expert_mlp
from .predictor import Predictor
from .sources import bank_views, open_expert_source


class ExpertProvider(Experts, Protocol):
    """The MoE block's Experts (forward) plus what the engine needs of them."""

    def graph_safe(self, tokens: int) -> bool:
        """Whether forward on this many tokens never synchronises with the host, so a decode step can be
        captured in a CUDA graph."""
        ...

    def stats(self, since: dict | None = None) -> dict:
        """Statistics since the last reset_stats(), or since `since` (an earlier stats() of this run)."""
        ...

    def reset_stats(self) -> None: ...

    def attach(self, predictor: Predictor) -> None:
        """Receive the next-layer expert predictor once the model is built (for prefetch)."""
        ...


class ResidentExperts:
    """Every expert of every layer stacked on one device: gate_up [E, 2I, H], down [E, H, I] per layer."""

    def __init__(self, banks: dict[int, tuple[torch.Tensor, torch.Tensor]], top_k: int):
        self.banks, self.top_k = banks, top_k

    def graph_safe(self, tokens: int) -> bool:
        # The gathered path (few token-expert pairs) never synchronises; the per-expert loop does.
        return tokens * self.top_k <= GATHER_MAX_PAIRS

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.banks[layer]
        return expert_mlp(x, ids, weights, gate_up, down)

    def stats(self, since: dict | None = None) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass

    def attach(self, predictor: Predictor) -> None:
        pass


def load_resident(source, progress=None) -> ResidentExperts:
    """Read every expert of every MoE layer into stacked banks on source.device (no offload)."""
    args = source.args
    hidden, inter = args.expert_shape
    experts = open_expert_source(source)
    task = progress.add_task("experts", total=len(args.moe_layers)) if progress else None
    banks = {}
    for layer in args.moe_layers:
        flat = torch.empty(args.num_experts, args.expert_numel(), dtype=source.dtype, device=source.device)
        for e in range(args.num_experts):
            experts.read_into(layer, e, flat[e])
        banks[layer] = bank_views(flat, hidden, inter)
        if progress:
            progress.advance(task)
    return ResidentExperts(banks, args.top_k)
