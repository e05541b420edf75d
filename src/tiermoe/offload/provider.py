"""The interface between the MoE block and wherever experts live, and the all-resident provider.

A provider runs the routed experts of one layer for a batch of tokens. Keeping compute behind this
interface lets the tiered store decide per expert where it runs (GPU slot, CPU) and in what order,
and lets quantized kernels plug in, without the model files changing.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..formats.base import ExpertFormat
from ..models.moe import Experts
from .predictor import Predictor
from .sources import open_expert_source


class ExpertProvider(Experts, Protocol):
    """The MoE block's Experts (forward) plus what the engine needs of them."""

    def graph_safe(self, tokens: int) -> bool:
        """Whether forward on this many tokens never synchronises with the host, so a decode step can be
        captured in a CUDA graph."""
        ...

    def stats(self, since: dict | None = None) -> dict:
        """Statistics since the provider was built, or since `since` (an earlier stats())."""
        ...

    def attach(self, predictor: Predictor) -> None:
        """Receive the next-layer expert predictor once the model is built (for prefetch)."""
        ...

    def after_step(self, tokens: int) -> None:
        """A decode step of `tokens` rows (padding rows of its graph included) has finished (the engine
        holds its sampled tokens): bookkeeping the step's graph could not do."""
        ...


class ResidentExperts:
    """Every expert of every layer on one device, a bank of the format's views per layer (expert id =
    index in the bank)."""

    def __init__(
        self, banks: dict[int, dict[str, torch.Tensor]], fmt: ExpertFormat, top_k: int, device: torch.device
    ):
        self.banks, self.format, self.top_k, self.device = banks, fmt, top_k, device

    def graph_safe(self, tokens: int) -> bool:
        return self.format.graph_safe(tokens * self.top_k, self.device)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.format.mlp(x, ids, weights, self.banks[layer])

    def stats(self, since: dict | None = None) -> dict:
        return {}

    def attach(self, predictor: Predictor) -> None:
        pass

    def after_step(self, tokens: int) -> None:
        pass


def load_resident(source, progress=None) -> ResidentExperts:
    """Read every expert of every MoE layer into stacked banks on source.device (no offload)."""
    args, fmt = source.args, source.format
    experts = open_expert_source(source)
    task = progress.add_task("experts", total=len(args.moe_layers)) if progress else None
    banks = {}
    for layer in args.moe_layers:
        flat = fmt.empty(args.num_experts, source.device)
        for e in range(args.num_experts):
            experts.read_into(layer, e, flat[e])
        banks[layer] = fmt.views(flat)
        if progress:
            progress.advance(task)
    return ResidentExperts(banks, fmt, args.top_k, source.device)
