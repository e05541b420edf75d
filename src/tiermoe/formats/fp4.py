"""NVFP4 experts: e2m1 values (4 bits) with an e4m3 scale per 16 values and a float32 scale per tensor,
as NVIDIA's ModelOpt publishes them (e.g. nvidia/Qwen3-30B-A3B-FP4).

config.json: `quantization_config = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}`.
Each projection `P` stores `P.weight` uint8 [out, in / 2] (value 2 j in the low nibble of byte j, 2 j + 1
in the high one), `P.weight_scale` float8 e4m3 [out, in / 16], `P.weight_scale_2` float32 [] and an
`input_scale` for activations, which a weight-only engine does not use. w = e2m1 x weight_scale x
weight_scale_2. 4.5 bits a weight in every tier.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .base import Piece
from .fp8 import E4M3, E4M3_MAX
from .quantized import DequantizingFormat, per_expert_names

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; bit 3 is the sign
E2M1_MAX = 6.0
GROUP = 16


def e2m1_table(device=None) -> torch.Tensor:
    """float32 [16]: the value of every 4-bit code."""
    v = torch.tensor(E2M1_VALUES, device=device)
    return torch.cat([v, -v])


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] of 0..15 -> uint8 [..., K / 2], element 2 j in the low nibble of byte j."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles' inverse: uint8 [..., K / 2] -> int64 codes [..., K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).long()


def to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into -6..6) to the nearest e2m1 code, ties to the even code."""
    table = e2m1_table(x.device)[:8]
    mag = x.abs().clamp(max=E2M1_MAX)
    dist = (mag[..., None] - table).abs()  # [..., 8]
    code = dist.argmin(-1)  # first minimum: the lower code on ties
    return torch.where(x < 0, code + 8, code)


def check_blocks(hidden: int, inter: int, group: int, fmt: str) -> None:
    """An expert's inputs (hidden for gate_up, inter for down) must fill whole blocks of `group` values."""
    for k, what in ((hidden, "hidden_size"), (inter, "moe_intermediate_size")):
        if k % group:
            raise CheckpointError(f"config.json: {what} {k} is no multiple of {fmt}'s {group}-value blocks")


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K / 2], e4m3 scales [N, K / 16], float32 global scale []):
    the global scale maps the tensor's largest magnitude to e2m1's largest times e4m3's largest, each
    block's scale its own largest to e2m1's largest (ModelOpt's recipe), values rounded to nearest."""
    w = w.float()
    scale_2 = (w.abs().amax() / (E2M1_MAX * E4M3_MAX)).clamp(min=1e-12)
    blocks = w.unflatten(-1, (-1, GROUP))  # [N, K/16, 16]
    scale = (blocks.abs().amax(-1) / E2M1_MAX / scale_2).clamp(max=E4M3_MAX).to(E4M3)
    per_block = (scale.float() * scale_2).clamp(min=1e-30)[..., None]
    codes = to_e2m1(blocks / per_block).flatten(-2)
    return pack_nibbles(codes), scale, scale_2


def dequantize_nvfp4(packed, scale, scale_2, dtype) -> torch.Tensor:
    """packed uint8 [..., N, K / 2], scale e4m3 [..., N, K / 16], scale_2 float32 [...] -> [..., N, K]."""
    values = e2m1_table(packed.device)[unpack_nibbles(packed)]  # [..., N, K]
    per_block = scale.float() * scale_2.float()[..., None, None]
    return (values.unflatten(-1, (-1, GROUP)) * per_block[..., None]).flatten(-2).to(dtype)


class Nvfp4Format(DequantizingFormat):
    """gate_up [2I, H / 2] packed (gate rows, then up rows), its e4m3 scales [2I, H / 16] and its two
    global scales [2] (gate's, up's), then down [H, I / 2], [H, I / 16] and [1]."""

    kernels = "nvfp4"  # triton_kernels' GEMV and grouped GEMM on CUDA

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, kind: ExpertKind = SWIGLU):
        check_blocks(hidden, inter, GROUP, "NVFP4")
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.name = "nvfp4 (e2m1, e4m3 scales per 16)"
        h, i = hidden, inter
        self.lay_out([
            ("gate_up", torch.uint8, (2 * i, h // 2)),
            ("gate_up_scale", E4M3, (2 * i, h // GROUP)),
            ("gate_up_scale_2", torch.float32, (2,)),
            ("down", torch.uint8, (h, i // 2)),
            ("down_scale", E4M3, (h, i // GROUP)),
            ("down_scale_2", torch.float32, (1,)),
        ], kind)  # fmt: skip

    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        h, i = self.hidden, self.inter
        gate, up, down = per_expert_names(names, layer, expert, fused, "nvfp4")
        u8, f8, f32 = (torch.uint8,), (E4M3,), (torch.float32,)
        return [
            Piece("gate_up", 0, f"{gate}.weight", (i, h // 2), dtypes=u8),
            Piece("gate_up", i * h // 2, f"{up}.weight", (i, h // 2), dtypes=u8),
            Piece("gate_up_scale", 0, f"{gate}.weight_scale", (i, h // GROUP), dtypes=f8),
            Piece("gate_up_scale", i * h // GROUP, f"{up}.weight_scale", (i, h // GROUP), dtypes=f8),
            Piece("gate_up_scale_2", 0, f"{gate}.weight_scale_2", (), dtypes=f32),
            Piece("gate_up_scale_2", 1, f"{up}.weight_scale_2", (), dtypes=f32),
            Piece("down", 0, f"{down}.weight", (h, i // 2), dtypes=u8),
            Piece("down_scale", 0, f"{down}.weight_scale", (h, i // GROUP), dtypes=f8),
            Piece("down_scale_2", 0, f"{down}.weight_scale_2", (), dtypes=f32),
        ]

    def ignored(self, name: str) -> bool:
        return name.endswith(".input_scale")  # activation scales: weights only here

    def companions(self, name: str) -> tuple[str, ...]:
        return (name + "_scale", name + "_scale_2") if name.endswith(".weight") else ()

    def dense_weight(self, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        scale, scale_2 = tensors.get(name + "_scale"), tensors.get(name + "_scale_2")
        if scale is None or scale_2 is None:  # left unquantized (norms, embeddings, routers, lm_head)
            return tensors[name].to(dtype)
        w = tensors[name]
        if (
            w.dtype != torch.uint8
            or scale.dtype != E4M3
            or tuple(scale.shape) != (w.shape[0], w.shape[1] * 2 // GROUP)
        ):
            raise CheckpointError(
                f"tensor {name}: NVFP4 weights must be uint8 [out, in / 2] with e4m3 scales [out, in / 16]; got "
                f"{w.dtype} {list(w.shape)} with {scale.dtype} {list(scale.shape)}"
            )
        return dequantize_nvfp4(w, scale, scale_2, dtype)

    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        h, i, dev = self.hidden, self.inter, generator.device
        views = self.views(expert[None])
        for prefix, ws in (
            ("gate_up", [torch.randn(i, h, generator=generator, device=dev) * std for _ in range(2)]),
            ("down", [torch.randn(h, i, generator=generator, device=dev) * std]),
        ):
            packed, scales, globals_ = zip(*(quantize_nvfp4(w) for w in ws), strict=True)
            views[prefix][0].copy_(torch.cat(packed))
            views[f"{prefix}_scale"][0].copy_(torch.cat(scales))
            views[f"{prefix}_scale_2"][0].copy_(torch.stack(globals_))

    def dequantize(self, bank: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, i = slots.numel(), self.hidden, self.inter
        gate_up = dequantize_nvfp4(
            bank["gate_up"][slots].view(n, 2, i, h // 2),
            bank["gate_up_scale"][slots].view(n, 2, i, h // GROUP),
            bank["gate_up_scale_2"][slots],
            self.dtype,
        ).view(n, 2 * i, h)
        down = dequantize_nvfp4(
            bank["down"][slots], bank["down_scale"][slots], bank["down_scale_2"][slots][:, 0], self.dtype
        )
        return gate_up, down


class Nvfp4Writer:
    """Writes experts as ModelOpt's NVFP4 checkpoints store them (`tiermoe convert --experts nvfp4`)."""

    name = "nvfp4"

    def __init__(self):
        self.config = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": GROUP}

    def specs(self, base: str, out_features: int, in_features: int) -> list[tuple[str, torch.dtype, tuple]]:
        n, k = out_features, in_features
        return [
            (f"{base}.weight", torch.uint8, (n, k // 2)),
            (f"{base}.weight_scale", E4M3, (n, k // GROUP)),
            (f"{base}.weight_scale_2", torch.float32, ()),
        ]

    def quantize(self, base: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scale, scale_2 = quantize_nvfp4(w)
        return {f"{base}.weight": packed, f"{base}.weight_scale": scale, f"{base}.weight_scale_2": scale_2}
