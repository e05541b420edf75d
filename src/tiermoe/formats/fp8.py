"""FP8 experts with block scales, as published for Qwen3-*-FP8 and DeepSeek-V3.

config.json: `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
...}`. Each projection `P` stores `P.weight`, float8 e4m3 [out, in], and `P.weight_scale_inv`, float32
[ceil(out / bo), ceil(in / bi)]: the weight is w[r, c] * weight_scale_inv[r // bo, c // bi] (the name is
DeepSeek's: the inverse of the scale that quantized it). Experts stay FP8 in every tier, one byte a weight;
the dense linear layers are dequantized at load, or kept in FP8 too (`Fp8Linear`) where bf16 would not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .base import Piece
from .quantized import DequantizingFormat, per_expert_names

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
SCALE_SUFFIX = "_scale_inv"  # beside a quantized `.weight`


def blocks(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The block-scale grid of a [rows, cols] weight: (ceil(rows / bo), ceil(cols / bi))."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """scale [..., R, C] per block -> [..., rows, cols] per weight."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[
        ..., :cols
    ]


def dequantize_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype
) -> torch.Tensor:
    """w = q * scale_inv per block: q e4m3 [..., rows, cols], scale_inv float32 [..., R, C] -> dtype."""
    rows, cols = q.shape[-2:]
    return (q.float() * _expand(scale_inv.float(), rows, cols, block)).to(dtype)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (e4m3 values, float32 scale_inv [..., R, C]): each block scaled so its
    largest magnitude is e4m3's largest finite value, then rounded to nearest (what DeepSeek's and
    transformers' FP8 quantizers do)."""
    rows, cols = w.shape[-2:]
    r, c = blocks(rows, cols, block)
    padded = torch.zeros(*w.shape[:-2], r * block[0], c * block[1], dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.float()
    tiles = padded.unflatten(-1, (c, block[1])).unflatten(-3, (r, block[0]))  # [..., r, bo, c, bi]
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., r, c]
    scale_inv = amax / E4M3_MAX
    q = (w.float() / _expand(scale_inv, rows, cols, block)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale_inv


class Fp8BlockFormat(DequantizingFormat):
    """gate_up [2I, H] e4m3 (gate rows, then up rows) with scales [2, Ri, Ch] (gate's, then up's, so the
    blocks stay whole when I is no multiple of the block), down [H, I] e4m3 with scales [Rh, Ci]."""

    kernels = "fp8"  # triton_kernels' GEMV and grouped GEMM on CUDA

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        block: tuple[int, int] = (128, 128),
        kind: ExpertKind = SWIGLU,
    ):
        self.hidden, self.inter, self.dtype, self.block = hidden, inter, dtype, tuple(block)
        self.name = f"fp8 (e4m3, {block[0]}x{block[1]} block scales)"
        self.gate_blocks, self.down_blocks = blocks(inter, hidden, block), blocks(hidden, inter, block)
        self.lay_out([
            ("gate_up", E4M3, (2 * inter, hidden)),
            ("gate_up_scale", torch.float32, (2, *self.gate_blocks)),
            ("down", E4M3, (hidden, inter)),
            ("down_scale", torch.float32, self.down_blocks),
        ], kind)  # fmt: skip

    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        h, i = self.hidden, self.inter
        gate, up, down = per_expert_names(names, layer, expert, fused, "fp8")
        n = math.prod(self.gate_blocks)
        w, s = (E4M3,), (torch.float32,)
        return [
            Piece("gate_up", 0, f"{gate}.weight", (i, h), dtypes=w),
            Piece("gate_up", i * h, f"{up}.weight", (i, h), dtypes=w),
            Piece("gate_up_scale", 0, f"{gate}.weight{SCALE_SUFFIX}", self.gate_blocks, dtypes=s),
            Piece("gate_up_scale", n, f"{up}.weight{SCALE_SUFFIX}", self.gate_blocks, dtypes=s),
            Piece("down", 0, f"{down}.weight", (h, i), dtypes=w),
            Piece("down_scale", 0, f"{down}.weight{SCALE_SUFFIX}", self.down_blocks, dtypes=s),
        ]

    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        h, i, dev = self.hidden, self.inter, generator.device
        views = self.views(expert[None])
        gate_up = torch.randn(2, i, h, generator=generator, device=dev) * std
        down = torch.randn(h, i, generator=generator, device=dev) * std
        for (q, s), (wq, ws) in (
            (quantize_blocks(gate_up, self.block), ("gate_up", "gate_up_scale")),
            (quantize_blocks(down, self.block), ("down", "down_scale")),
        ):
            views[wq][0].copy_(q.reshape(views[wq][0].shape))
            views[ws][0].copy_(s.reshape(views[ws][0].shape))

    def companions(self, name: str) -> tuple[str, ...]:
        return (name + SCALE_SUFFIX,) if name.endswith(".weight") else ()

    def dense_weight(self, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None:  # left unquantized (norms, embeddings, routers, lm_head)
            return tensors[name].to(dtype)
        w = tensors[name]
        expected = blocks(*w.shape, self.block)
        if w.dtype != E4M3 or tuple(scale.shape) != expected or scale.dtype != torch.float32:
            raise CheckpointError(
                f"tensor {name}: fp8 weights must be float8_e4m3fn with float32 scales {list(expected)} for "
                f"{self.block[0]}x{self.block[1]} blocks; got {w.dtype} {list(w.shape)} with {scale.dtype} "
                f"{list(scale.shape)}"
            )
        return w if dtype == E4M3 else dequantize_blocks(w, scale, self.block, dtype)  # E4M3: an Fp8Linear's

    def keep_linears(self, model: nn.Module, quantized: Callable[[str], bool]) -> int:
        """Make every linear layer of the decoder layers whose weight the checkpoint stores quantized (the
        names `quantized` accepts) an Fp8Linear, as the module tree is built on the meta device; modules
        whose weight a caller reads itself (READ_WEIGHTS) stay. Returns how many were replaced."""
        swapped = 0
        for parent_name, parent in list(model.named_modules()):
            kept = getattr(parent, "READ_WEIGHTS", ())
            for child_name, child in list(parent.named_children()):
                name = f"{parent_name}.{child_name}"
                if (
                    type(child) is nn.Linear
                    and name.startswith("model.layers.")
                    and child_name not in kept
                    and quantized(name)
                ):
                    setattr(parent, child_name, Fp8Linear(child, self.block))
                    swapped += 1
        return swapped

    def dequantize(self, bank: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, i = slots.numel(), self.hidden, self.inter
        gate_up = bank["gate_up"][slots].view(n, 2, i, h)
        gate_up = dequantize_blocks(gate_up, bank["gate_up_scale"][slots], self.block, self.dtype)
        down = dequantize_blocks(bank["down"][slots], bank["down_scale"][slots], self.block, self.dtype)
        return gate_up.view(n, 2 * i, h), down


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays as an FP8 checkpoint stores it, e4m3 with a float32 scale per
    block: one byte a weight on the GPU instead of two. Each forward dequantizes the weight into the
    activations' dtype (a transient of two bytes a weight, inside the workspace) and runs F.linear."""

    FLOAT32_PARAMETERS = ("weight_scale_inv",)

    def __init__(self, linear: nn.Linear, block: tuple[int, int]):
        super().__init__()
        out, inp, device = linear.out_features, linear.in_features, linear.weight.device
        self.block = block
        self.weight = nn.Parameter(torch.empty(out, inp, dtype=E4M3, device=device), requires_grad=False)
        scale = torch.empty(blocks(out, inp, block), dtype=torch.float32, device=device)
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, dequantize_blocks(self.weight, self.weight_scale_inv, self.block, x.dtype), self.bias
        )


class Fp8Writer:
    """Writes experts as Qwen3-*-FP8 publishes them (`tiermoe convert --experts fp8`)."""

    name = "fp8"

    def __init__(self, block: tuple[int, int] = (128, 128)):
        self.block = tuple(block)
        self.config = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
        }  # fmt: skip

    def specs(self, base: str, out_features: int, in_features: int) -> list[tuple[str, torch.dtype, tuple]]:
        return [
            (f"{base}.weight", E4M3, (out_features, in_features)),
            (f"{base}.weight{SCALE_SUFFIX}", torch.float32, blocks(out_features, in_features, self.block)),
        ]

    def quantize(self, base: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale_inv = quantize_blocks(w, self.block)
        return {f"{base}.weight": q, f"{base}.weight{SCALE_SUFFIX}": scale_inv}
