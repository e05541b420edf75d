"""Predict the next MoE layer's experts before it runs, so their transfers can start early.

Router lookahead (mixtral-offloading, arXiv 2312.17238): apply layer L+1's router to layer L's MoE
input. The residual stream changes little between adjacent layers, so this guesses most of L+1's
experts; the store measures how many (precision and recall) on every step."""

from __future__ import annotations

import itertools
from typing import Protocol

import torch
from torch import nn


class Predictor(Protocol):
    def predict(self, layer: int, x: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(next MoE layer, its predicted expert ids [T, k]) from layer's MoE input x [T, H]; None after
        the last MoE layer."""
        ...


class RouterLookahead:
    def __init__(self, routers: dict[int, nn.Module]):
        layers = sorted(routers)
        self.routers = routers
        self.next_layer = dict(itertools.pairwise(layers))

    def predict(self, layer: int, x: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(next MoE layer, its predicted expert ids [T, k]) from layer's MoE input x [T, H]."""
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return None
        _, ids = self.routers[nxt](x)
        return nxt, ids
