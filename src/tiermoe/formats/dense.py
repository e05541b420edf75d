"""Experts in the compute dtype (bf16, fp16 or fp32): the format of unquantized checkpoints."""

from __future__ import annotations

import torch

from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .base import ExpertFormat, Piece
from .swiglu import GATHER_MAX_PAIRS, GROUPED_MAX_PAIRS, accumulate_pairs, expert_mlp

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class DenseFormat(ExpertFormat):
    """gate_up [2I, H] (gate rows, then up rows) and down [H, I], as transformers' fused experts."""

    kernels = "dense"  # decode on CUDA: triton_kernels' GEMV reads the slots in place

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, kind: ExpertKind = SWIGLU):
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.name = DTYPE_NAMES[dtype]
        self.lay_out([("gate_up", dtype, (2 * inter, hidden)), ("down", dtype, (hidden, inter))], kind)

    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        h, i = self.hidden, self.inter
        if fused:
            gate_up, down = (n.format(layer=layer) for n in names.fused)
            t = names.fused_in_out
            return [
                Piece(
                    "gate_up",
                    0,
                    gate_up,
                    (h, 2 * i) if t else (2 * i, h),
                    expert,
                    transposed=t,
                    interleaved=names.interleaved,
                ),
                Piece("down", 0, down, (i, h) if t else (h, i), expert, transposed=t),
            ]
        gate, up, down = (n.format(layer=layer, expert=expert) for n in names.per_expert)
        return [
            Piece("gate_up", 0, gate, (i, h)),
            Piece("gate_up", i * h, up, (i, h)),
            Piece("down", 0, down, (h, i)),
        ]

    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        views = self.views(expert[None])
        weights = [p for p in self.parts if p.name in ("gate_up", "down")]
        numel = sum(p.numel for p in weights)
        # Drawn where the generator lives (the GPU), copied into the expert wherever it is (pinned host memory)
        values = torch.randn(numel, generator=generator, device=generator.device, dtype=torch.float32) * std
        start = 0
        for p in weights:
            views[p.name].view(-1).copy_(values[start : start + p.numel])
            start += p.numel

    def mlp(self, x, slots, weights, bank):
        pairs = slots.numel()
        if GATHER_MAX_PAIRS < pairs <= GROUPED_MAX_PAIRS and (grouped := self._kernel(x, "grouped")):
            # A batched decode step: the grouped GEMM, blocks found on the GPU (no sync; skips served pairs).
            return grouped(self, x, slots, weights, bank)
        kernel = self._kernel(x, "mlp")
        if kernel and pairs <= GATHER_MAX_PAIRS:
            return kernel(self, x, slots, weights, bank)
        return expert_mlp(x, slots, weights, bank["gate_up"], bank["down"], self.kind, self.biases(bank))

    def accumulate(self, x, tokens, slots, weights, bank, out):
        # Prefill: torch's per-expert loop, whose cuBLAS GEMMs beat the grouped GEMM at many tokens an expert.
        return accumulate_pairs(
            x, tokens, slots, weights, bank["gate_up"], bank["down"], out, self.kind, self.biases(bank)
        )
