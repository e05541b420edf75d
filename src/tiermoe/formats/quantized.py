"""What quantized expert formats share: in torch (CPU, tests, and the GPU until a format's kernel is
used), the experts a step uses are dequantized to the compute dtype and run as dense SwiGLU experts."""

from __future__ import annotations

from abc import abstractmethod

import torch

from ..errors import CheckpointError
from ..models.names import ExpertNames
from .base import ExpertFormat
from .swiglu import GATHER_MAX_PAIRS, accumulate_pairs, expert_mlp


class DequantizingFormat(ExpertFormat):
    dtype: torch.dtype  # the compute dtype the experts are dequantized to

    @abstractmethod
    def dequantize(self, bank: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts at slots [n] of a bank, in the compute dtype: gate_up [n, 2I, H], down [n, H, I]."""

    def mlp(self, x, slots, weights, bank):
        t, k = slots.shape
        if t * k > GATHER_MAX_PAIRS:  # the grouped GEMM on CUDA (no host sync), torch's loop elsewhere
            if grouped := self._kernel(x, "grouped"):
                return grouped(self, x, slots, weights, bank)
            tokens = torch.arange(t, device=x.device).repeat_interleave(k)
            return self.accumulate(
                x, tokens, slots.reshape(-1), weights.reshape(-1), bank, torch.zeros_like(x)
            )
        kernel = self._kernel(x, "mlp")
        if kernel:  # decode: the fused grouped GEMV
            return kernel(self, x, slots, weights, bank)
        # Few pairs (decode): dequantize each pair's expert, duplicates and all, with no host sync.
        flat = slots.reshape(-1)
        gate_up, down = self.dequantize(bank, flat)
        pairs = torch.arange(t * k, device=x.device).view(t, k)
        biases = self.biases(bank)
        biases = None if biases is None else (biases[0][flat], biases[1][flat])
        return expert_mlp(x, pairs, weights, gate_up, down, self.kind, biases)

    def accumulate(self, x, tokens, slots, weights, bank, out):
        kernel = self._kernel(x, "accumulate")
        if kernel:  # prefill and large batches: the grouped GEMM
            return kernel(self, x, tokens, slots, weights, bank, out)
        served = slots < 0  # another wave's or the CPU's pairs: nothing from here
        tokens, slots, weights = tokens[~served], slots[~served], weights[~served]
        used, inverse = torch.unique(slots, return_inverse=True)
        gate_up, down = self.dequantize(bank, used)
        biases = self.biases(bank)
        biases = None if biases is None else (biases[0][used], biases[1][used])
        return accumulate_pairs(x, tokens, inverse, weights, gate_up, down, out, self.kind, biases)


def per_expert_names(
    names: ExpertNames, layer: int, expert: int, fused: bool, method: str
) -> tuple[str, ...]:
    """(gate, up, down) weight names of one expert without the `.weight` suffix, under which a quantized
    checkpoint stores each projection's tensors (`.qweight`, `.weight_scale_inv`, ...). Published quantized
    checkpoints store experts one by one; a fused layout is refused by name."""
    if fused:
        raise CheckpointError(
            f"{names.fused[0].format(layer=layer)}: {method} experts stored fused (all of a layer's experts in "
            "one tensor) are not supported; published checkpoints store each expert's projections apart"
        )
    return tuple(n.format(layer=layer, expert=expert).removesuffix(".weight") for n in names.per_expert)
