"""The expert format seam: one object per format owns an expert's bytes.

Everything that stores or moves experts (GPU slots, the pinned host cache, the disk reader, the memory
plan) holds each expert as `nbytes` raw bytes; only the format knows what they are: the named parts
(packed weights, scales, zero points) at aligned offsets, which checkpoint tensors fill them, how to
view a bank of experts as tensors, and how to run the experts over such a bank.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .swiglu import GATHER_MAX_PAIRS, GROUPED_MAX_PAIRS

ALIGN_BYTES = 256  # every part starts at a multiple of this: aligned loads in kernels, views of any dtype


@dataclass(frozen=True)
class Part:
    """One named tensor inside an expert's bytes, e.g. gate_up [2, I, H] bf16 or its scales."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the expert

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[tuple[Part, ...], int]:
    """Parts placed one after another at ALIGN_BYTES boundaries, and the expert's size in bytes."""
    parts, offset = [], 0
    for name, dtype, shape in specs:
        parts.append(Part(name, dtype, tuple(shape), offset))
        offset += -(-math.prod(shape) * dtype.itemsize // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(parts), offset


@dataclass(frozen=True)
class Piece:
    """A checkpoint tensor (or the index-th slice of a fused one) that fills part of a Part: its values,
    flattened, go to the part's elements [start, start + numel)."""

    part: str
    start: int
    name: str  # the tensor's name as the model files use it (after the architecture's renames)
    shape: tuple[int, ...]  # of the tensor, or of the slice
    index: int | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes the checkpoint may store; None: any float
    tag: str | None = None  # how the format's put() turns the stored values into the part's (repacking)
    transposed: bool = False  # stored [in, out] (ExpertNames.fused_in_out): put() transposes it
    interleaved: bool = False  # rows alternate gate and up (ExpertNames.interleaved): put() separates them


class ExpertFormat(ABC):
    """How one expert of (hidden H, intermediate I) is stored, read and computed in this format."""

    name: str
    hidden: int
    inter: int
    dtype: torch.dtype  # the compute dtype (and the biases')
    kind: ExpertKind = SWIGLU
    parts: tuple[Part, ...]
    nbytes: int  # one expert, alignment included
    # On CUDA: triton_kernels' GEMV for decode and grouped GEMM for many pairs, its constants and launch
    # named by `kernels` (None: torch only).
    kernels: str | None = None

    def lay_out(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], kind: ExpertKind) -> None:
        """Set parts and nbytes: the format's weight parts, then the biases where `kind` has them (named
        <projection>_bias, as the kernels find them)."""
        self.kind = kind
        if kind.bias:
            specs = [
                *specs,
                ("gate_up_bias", self.dtype, (2 * self.inter,)),
                ("down_bias", self.dtype, (self.hidden,)),
            ]
        self.parts, self.nbytes = layout(specs)

    def biases(self, bank: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up [S, 2I], down [S, H]) biases of a bank's views, None where the experts have none."""
        return (bank["gate_up_bias"], bank["down_bias"]) if self.kind.bias else None

    def _kernel(self, x: torch.Tensor, what: str):
        if not (x.is_cuda and self.kernels):
            return None
        from . import triton_kernels  # imported on first use: triton decides compiled or interpreted then

        # decode: the GEMV ("mlp"), or the grouped GEMM for many pairs ("grouped", its pairs' outputs apart:
        # "pairs"); prefill and the copy path's waves: the grouped GEMM's scatter-add ("accumulate")
        entries = {
            "mlp": triton_kernels.bank_mlp,
            "grouped": triton_kernels.grouped_mlp,
            "pairs": triton_kernels.grouped_pairs,
            "accumulate": triton_kernels.grouped_accumulate,
        }
        return entries[what]

    def views(self, bank: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each part of a bank of experts, bank: uint8 [S, nbytes] -> {name: [S, *part.shape]}."""
        s = bank.shape[0]
        return {
            p.name: bank[:, p.offset : p.offset + p.nbytes].view(p.dtype).view(s, *p.shape)
            for p in self.parts
        }

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def put(self, views: dict[str, torch.Tensor], piece: Piece, values: torch.Tensor) -> None:
        """Write one checkpoint tensor's values where `piece` says, in an expert's views (of a bank of one)."""
        if piece.transposed:
            values = values.mT
        if piece.interleaved:  # [2I, ...] rows gate 0, up 0, gate 1, ... -> [2, I, ...]: gate rows, up rows
            values = values.unflatten(0, (-1, 2)).transpose(0, 1)
        views[piece.part].view(-1)[piece.start : piece.start + values.numel()].copy_(values.reshape(-1))

    def ignored(self, name: str) -> bool:
        """Whether a checkpoint tensor beside the experts carries nothing this format needs."""
        return False

    def empty(self, count: int, device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
        """An uninitialised bank of `count` experts: uint8 [count, nbytes]."""
        return torch.empty(count, self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)

    def pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        """The checkpoint tensors that make up one expert, in the per-expert or the fused layout."""
        return self.weight_pieces(names, layer, expert, fused) + self._bias_pieces(
            names, layer, expert, fused
        )

    @abstractmethod
    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        """The checkpoint tensors of one expert's weights (and their scales), without its biases."""

    def _bias_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        if not self.kind.bias:
            return []
        h, i = self.hidden, self.inter
        if fused:
            if names.fused_bias is None:
                raise CheckpointError(
                    f"{names.fused[0].format(layer=layer)}: no names for these experts' biases"
                )
            gate_up, down = (n.format(layer=layer) for n in names.fused_bias)
            return [
                Piece("gate_up_bias", 0, gate_up, (2 * i,), expert, interleaved=names.interleaved),
                Piece("down_bias", 0, down, (h,), expert),
            ]
        gate, up, down = (
            n.format(layer=layer, expert=expert).removesuffix(".weight") + ".bias" for n in names.per_expert
        )
        return [
            Piece("gate_up_bias", 0, gate, (i,)),
            Piece("gate_up_bias", i, up, (i,)),
            Piece("down_bias", 0, down, (h,)),
        ]

    def fused_name(self, names: ExpertNames, layer: int) -> str:
        """The tensor that marks a checkpoint whose `layer` stores its experts fused (in this format)."""
        return names.fused[0].format(layer=layer)

    def fill_random(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Write a random expert (weights about normal(0, std), biases zero as synth writes them) into
        its bytes, uint8 [nbytes]: synthetic checkpoints whose experts are generated rather than read."""
        self.fill_weights(expert, generator, std)
        if self.kind.bias:
            views = self.views(expert[None])
            views["gate_up_bias"].zero_()
            views["down_bias"].zero_()

    @abstractmethod
    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """fill_random's weights (and their scales)."""

    @abstractmethod
    def mlp(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, bank: dict) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]): x [T, H], slots and weights [T, k], bank the
        views of the experts' bank. Above GATHER_MAX_PAIRS pairs, one whose slot is negative (served
        elsewhere) adds nothing; fewer must hold none (swiglu.skip_served points them at a held slot).
        Never synchronises with the host when graph_safe(T * k, x.device)."""

    @abstractmethod
    def accumulate(self, x, tokens, slots, weights, bank: dict, out: torch.Tensor) -> torch.Tensor:
        """out[tokens[i]] += weights[i] * expert_{slots[i]}(x[tokens[i]]) for every pair i (1-d tensors)."""

    def mlp_pairs(self, x, slots, weights, bank: dict) -> torch.Tensor | None:
        """Each pair's weighted output apart, float32 [T, k, H], where mlp runs the grouped GEMM (CUDA, more
        than GATHER_MAX_PAIRS pairs, up to GROUPED_MAX_PAIRS), else None. mlp is their sum over k in
        float32, rounded once: a step split into waves that adds its waves' pairs (0 where another wave's)
        gets the bits of one mlp over all of them. Above GROUPED_MAX_PAIRS (a long prompt's chunk) a split
        step rounds each wave instead: the float32 buffer would be [pairs, H]."""
        if not GATHER_MAX_PAIRS < slots.numel() <= GROUPED_MAX_PAIRS:
            return None
        kernel = self._kernel(x, "pairs")
        return kernel(self, x, slots, weights, bank) if kernel else None

    def graph_safe(self, pairs: int, device: torch.device | str) -> bool:
        """Whether mlp over this many (token, expert) pairs on `device` runs without a host synchronisation:
        few pairs anywhere (torch's gathered matmul, the GEMV kernels), up to GROUPED_MAX_PAIRS where the
        format's grouped GEMM runs (CUDA)."""
        if pairs <= GATHER_MAX_PAIRS:
            return True
        return self.kernels is not None and torch.device(device).type == "cuda" and pairs <= GROUPED_MAX_PAIRS

    def describe(self) -> str:
        return self.name

    # Non-expert weights of a quantized checkpoint are dequantized at load: a weight may come with
    # companion tensors (its scales), which the format names and folds in.
    def companions(self, name: str) -> tuple[str, ...]:
        """Checkpoint tensors that may accompany the non-expert tensor `name` (e.g. its scales)."""
        return ()

    def dense_weight(self, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The non-expert tensor `name` in dtype from its stored value and whichever companions the
        checkpoint holds (tensors: name and those companions)."""
        return tensors[name].to(dtype)
