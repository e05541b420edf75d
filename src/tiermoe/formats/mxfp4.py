"""MXFP4 experts (OCP microscaling): e2m1 values (4 bits) with a power-of-two e8m0 scale per 32 values, as
gpt-oss publishes them.

config.json: `quantization_config = {"quant_method": "mxfp4", ...}`. A projection's tensor `P` (a layer's
fused experts, `...experts.gate_up_proj` [E, 2I, H] in gpt-oss) is stored as `P_blocks` uint8 [..., out,
in / 32, 16] (value 2 j of a block in the low nibble of byte j, 2 j + 1 in the high one) and `P_scales`
uint8 [..., out, in / 32], the scale 2^(byte - 127). Per-expert checkpoints (`tiermoe convert --experts
mxfp4`) name each expert's weight the same way: `...gate_proj.weight_blocks`. 4.25 bits a weight in every
tier.
"""

from __future__ import annotations

import torch

from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .base import Piece
from .fp4 import E2M1_MAX, check_blocks, e2m1_table, pack_nibbles, to_e2m1, unpack_nibbles
from .quantized import DequantizingFormat

GROUP = 32
E8M0_BIAS = 127
BLOCKS, SCALES = "_blocks", "_scales"


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (blocks uint8 [..., N, K / 32, 16], e8m0 scales uint8 [..., N, K / 32]): each
    block's scale the smallest power of two that brings its largest magnitude within e2m1's 6 (so nothing
    clips), values rounded to nearest."""
    blocks = w.float().unflatten(-1, (-1, GROUP))  # [..., N, K/32, 32]
    amax = blocks.abs().amax(-1)
    exp = torch.ceil(torch.log2(amax / E2M1_MAX)).nan_to_num(neginf=-E8M0_BIAS)  # amax 0: the smallest
    exp = exp.clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = to_e2m1(blocks / torch.exp2(exp)[..., None])
    return pack_nibbles(codes), (exp + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [..., N, K / 32, 16], scales uint8 [..., N, K / 32] -> [..., N, K]."""
    values = e2m1_table(blocks.device)[unpack_nibbles(blocks)]  # [..., N, K/32, 32]
    return (values * torch.exp2(scales.float() - E8M0_BIAS)[..., None]).flatten(-2).to(dtype)


class Mxfp4Format(DequantizingFormat):
    """gate_up [2I, H / 32, 16] (gate rows, then up rows) and its scales [2I, H / 32], then down
    [H, I / 32, 16] and [H, I / 32]."""

    kernels = "mxfp4"  # triton_kernels' GEMV and grouped GEMM on CUDA

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, kind: ExpertKind = SWIGLU):
        check_blocks(hidden, inter, GROUP, "MXFP4")
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.name = "mxfp4 (e2m1, e8m0 scales per 32)"
        h, i = hidden, inter
        self.lay_out([
            ("gate_up", torch.uint8, (2 * i, h // GROUP, GROUP // 2)),
            ("gate_up_scales", torch.uint8, (2 * i, h // GROUP)),
            ("down", torch.uint8, (h, i // GROUP, GROUP // 2)),
            ("down_scales", torch.uint8, (h, i // GROUP)),
        ], kind)  # fmt: skip

    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        h, i = self.hidden, self.inter
        u8 = (torch.uint8,)
        if fused:  # gpt-oss: every expert of a layer in one tensor per projection, sliced by expert
            gate_up, down = (n.format(layer=layer) for n in names.fused)
            mixed = names.interleaved
            return [
                Piece(
                    "gate_up",
                    0,
                    gate_up + BLOCKS,
                    (2 * i, h // GROUP, GROUP // 2),
                    expert,
                    u8,
                    interleaved=mixed,
                ),
                Piece(
                    "gate_up_scales", 0, gate_up + SCALES, (2 * i, h // GROUP), expert, u8, interleaved=mixed
                ),
                Piece("down", 0, down + BLOCKS, (h, i // GROUP, GROUP // 2), expert, u8),
                Piece("down_scales", 0, down + SCALES, (h, i // GROUP), expert, u8),
            ]
        gate, up, down = (n.format(layer=layer, expert=expert) for n in names.per_expert)
        return [
            Piece("gate_up", 0, gate + BLOCKS, (i, h // GROUP, GROUP // 2), dtypes=u8),
            Piece("gate_up", i * h // 2, up + BLOCKS, (i, h // GROUP, GROUP // 2), dtypes=u8),
            Piece("gate_up_scales", 0, gate + SCALES, (i, h // GROUP), dtypes=u8),
            Piece("gate_up_scales", i * h // GROUP, up + SCALES, (i, h // GROUP), dtypes=u8),
            Piece("down", 0, down + BLOCKS, (h, i // GROUP, GROUP // 2), dtypes=u8),
            Piece("down_scales", 0, down + SCALES, (h, i // GROUP), dtypes=u8),
        ]

    def fused_name(self, names: ExpertNames, layer: int) -> str:
        return names.fused[0].format(layer=layer) + BLOCKS

    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        h, i, dev = self.hidden, self.inter, generator.device
        views = self.views(expert[None])
        for prefix, w in (
            ("gate_up", torch.randn(2 * i, h, generator=generator, device=dev) * std),
            ("down", torch.randn(h, i, generator=generator, device=dev) * std),
        ):
            blocks, scales = quantize_mxfp4(w)
            views[prefix][0].copy_(blocks)
            views[f"{prefix}_scales"][0].copy_(scales)

    def dequantize(self, bank: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = dequantize_mxfp4(bank["gate_up"][slots], bank["gate_up_scales"][slots], self.dtype)
        down = dequantize_mxfp4(bank["down"][slots], bank["down_scales"][slots], self.dtype)
        return gate_up, down


class Mxfp4Writer:
    """Writes experts in MXFP4, each expert's weight as `<name>_blocks` and `<name>_scales`
    (`tiermoe convert --experts mxfp4`)."""

    name = "mxfp4"

    def __init__(self):
        self.config = {"quant_method": "mxfp4"}

    def specs(self, base: str, out_features: int, in_features: int) -> list[tuple[str, torch.dtype, tuple]]:
        n, k = out_features, in_features
        return [
            (f"{base}.weight{BLOCKS}", torch.uint8, (n, k // GROUP, GROUP // 2)),
            (f"{base}.weight{SCALES}", torch.uint8, (n, k // GROUP)),
        ]

    def quantize(self, base: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks, scales = quantize_mxfp4(w)
        return {f"{base}.weight{BLOCKS}": blocks, f"{base}.weight{SCALES}": scales}
