"""Routers and the sparse MoE block. The block never touches expert weights: it routes and hands the
tokens to its `Experts` (one method), which own where the experts live and how they run; the engine's
wider view of them (graph safety, statistics, prefetch) is offload/provider.py's ExpertProvider."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, fused_kernels


class Experts(Protocol):
    """All the MoE block asks of the experts."""

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids and weights [T, k] -> sum_k weights * expert_ids(x), [T, H]."""
        ...


class RoutingOverride(Protocol):
    """Decides expert ids in place of the routers' top-k (routing emulation, trace replay, recording)."""

    def route(self, layer: int, probs: torch.Tensor | None) -> torch.Tensor:
        """Expert ids [T, k] for MoE layer `layer` given the router probabilities probs [T, E] (None where
        needs_probs says they are not read)."""
        ...

    def needs_probs(self) -> bool:
        """Whether route reads the probabilities; if not, a router may skip computing them all."""
        ...


class SoftmaxTopKRouter(nn.Module):
    """softmax over all experts in fp32, top-k, optionally renormalised over the chosen k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(
        self, x: torch.Tensor, routing: RoutingOverride | None = None, layer: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k]). With an override the ids are its
        choice and the weights the router's probabilities of those experts, normalised as the model does."""
        logits = F.linear(x, self.weight)
        if fused := fused_kernels(x, self.weight):
            if routing is None:
                return fused.softmax_topk(logits, self.top_k, self.norm_topk_prob, x.dtype)
            if not routing.needs_probs():  # emulated routing: only the chosen experts' weights
                ids = routing.route(layer, None)
                return fused.softmax_pick(logits, ids, self.norm_topk_prob, x.dtype), ids
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if routing is None:
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
        else:
            ids = routing.route(layer, probs)
            weights = probs.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


class SparseMoeBlock(nn.Module):
    """Route, let the provider run the chosen experts, add the (optionally gated) shared expert."""

    def __init__(
        self,
        layer_idx: int,
        gate: nn.Module,  # a router: (x [T, H], routing override, layer) -> (weights, ids) [T, k]
        shared_expert: MLP | None = None,
        shared_expert_gate: nn.Linear | None = None,
    ):
        super().__init__()
        self.layer_idx, self.gate = layer_idx, gate
        # Set by the loader. Not a submodule: the provider owns its weights and where they live.
        self.experts: Experts | None = None
        self.routing: RoutingOverride | None = None  # set by the loader when routing is emulated or recorded
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids, shared = self.dense_part(x)
        return self.combine(self.experts.forward(self.layer_idx, x, ids, weights), shared).reshape(shape)

    @staticmethod
    def combine(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The block's output [T, H] from its routed experts' [T, H] and the shared expert's (or None)."""
        return routed if shared is None else routed + shared

    def dense_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything but the routed experts: (routing weights [T, k], expert ids [T, k], gated shared
        expert output [T, H] or None). x: [T, H]."""
        weights, ids = self.gate(x, self.routing, self.layer_idx)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return weights, ids, shared
