"""4-bit group-wise integer experts in the GPTQ layout; GPTQ and AWQ checkpoints load into it.

Layout of a projection with K inputs, N outputs and groups of G inputs (GPTQ's, as AutoGPTQ, GPTQModel
and Qwen's *-GPTQ-Int4 checkpoints store it):
  qweight int32 [K / 8, N]   input k = 8 i + j of column n in bits 4 j .. 4 j + 3 of qweight[i, n]
  qzeros  int32 [K / G, N / 8]   the zero point of output n = 8 c + j in bits 4 j .. of qzeros[g, c]
  scales  fp16  [K / G, N]
  w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = k // G.
GPTQ checkpoints ("checkpoint_format": "gptq", the default) store each zero minus one (zero - 1 mod 16);
this format keeps the zero itself (GPTQModel's "gptq_v2"), so a stored 15 (a zero of 0, wrapped) means
0, not 16. AWQ (AutoAWQ's GEMM layout) packs along the outputs instead, qweight [K, N / 8] and qzeros
[K / G, N / 8], eight outputs in the order 0 2 4 6 1 3 5 7, with plain zeros; it is repacked at load.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.experts import SWIGLU, ExpertKind
from ..models.names import ExpertNames
from .base import Piece
from .quantized import DequantizingFormat, per_expert_names

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output 8 c + AWQ_ORDER[j]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """int [..., K, N] of 0..15 -> int32 [..., K / 8, N], eight consecutive rows a word (GPTQ qweight)."""
    q = q.to(torch.int64).unflatten(-2, (-1, 8))  # [..., K/8, 8, N]
    word = (q << _SHIFTS.to(q.device, torch.int64)[:, None]).sum(dim=-2)
    return _to_int32(word)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """pack_rows' inverse: int32 [..., K / 8, N] -> int32 [..., K, N]."""
    q = (packed[..., None, :] >> _SHIFTS.to(packed.device)[:, None]) & 15  # [..., K/8, 8, N]
    return q.flatten(-3, -2)


def pack_cols(q: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int [..., R, N] of 0..15 -> int32 [..., R, N / 8]: nibble j of word c holds column 8 c + order[j]."""
    q = q.to(torch.int64).unflatten(-1, (-1, 8))[..., list(order)]  # [..., R, N/8, 8]
    return _to_int32((q << _SHIFTS.to(q.device, torch.int64)).sum(dim=-1))


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """pack_cols' inverse: int32 [..., R, N / 8] -> int32 [..., R, N]."""
    nibbles = (packed[..., None] >> _SHIFTS.to(packed.device)) & 15  # [..., R, N/8, 8]: nibble j
    inverse = [order.index(c) for c in range(8)]
    return nibbles[..., inverse].flatten(-2)


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def quantize_groups(w: torch.Tensor, group: int, clip: torch.Tensor | None = None):
    """Asymmetric round-to-nearest of w [..., N, K] (out, in) in groups of `group` inputs -> (q int32
    [..., K, N] of 0..15, zeros int32 [..., K / G, N], scales float32 [..., K / G, N]). clip [..., N, K / G]:
    each group's range shrunk by that factor (1: the full min..max)."""
    groups = w.float().unflatten(-1, (-1, group))  # [..., N, K/G, G]
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    zero = (-lo / scale).round().clamp(0, 15)
    q = (groups / scale[..., None] + zero[..., None]).round().clamp(0, 15).flatten(-2)  # [..., N, K]
    return tuple(t.transpose(-1, -2).contiguous() for t in (q.to(torch.int32), zero.to(torch.int32), scale))


def dequantize_groups(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """q [..., K, N], zeros and scales [..., K / G, N] -> w [..., N, K] (out, in) in dtype."""
    group = q.shape[-2] // scales.shape[-2]
    z = zeros.repeat_interleave(group, dim=-2).float()
    s = scales.repeat_interleave(group, dim=-2).float()
    return ((q.float() - z) * s).transpose(-1, -2).to(dtype).contiguous()


class Int4Format(DequantizingFormat):
    """gate and up stacked ([2, ...] of each tensor below, gate first), then down; GPTQ layout, zeros
    kept as they are (not minus one)."""

    kernels = "int4"  # triton_kernels' GEMV and grouped GEMM on CUDA

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        group: int,
        source: str = "gptq",
        kind: ExpertKind = SWIGLU,
    ):
        """group: inputs per group, -1 for one group per output (all K inputs); source: the checkpoint's
        layout, gptq (zeros minus one), gptq_v2 or awq."""
        self.hidden, self.inter, self.dtype, self.source, self.group = hidden, inter, dtype, source, group
        h, i = hidden, inter
        self.groups = {"gate_up": group if group > 0 else h, "down": group if group > 0 else i}  # G by K
        for k, g, what in (
            (h, self.groups["gate_up"], "hidden_size"),
            (i, self.groups["down"], "moe_intermediate_size"),
        ):
            if k % 8 or k % g:
                raise CheckpointError(
                    f"config.json: {what} {k} is no multiple of 8 and of the group size {g}: 4-bit experts need both"
                )
        gh, gi = h // self.groups["gate_up"], i // self.groups["down"]  # groups along K
        self.name = f"int4 ({source}, group {group})"
        self.lay_out([
            ("gate_up_qweight", torch.int32, (2, h // 8, i)),
            ("gate_up_qzeros", torch.int32, (2, gh, i // 8)),
            ("gate_up_scales", torch.float16, (2, gh, i)),
            ("down_qweight", torch.int32, (i // 8, h)),
            ("down_qzeros", torch.int32, (gi, h // 8)),
            ("down_scales", torch.float16, (gi, h)),
        ], kind)  # fmt: skip

    def weight_pieces(self, names: ExpertNames, layer: int, expert: int, fused: bool) -> list[Piece]:
        h, i = self.hidden, self.inter
        gate, up, down = per_expert_names(names, layer, expert, fused, self.source)
        awq = self.source == "awq"
        zeros_tag = {"awq": "awq", "gptq": "zeros_minus_one"}.get(self.source)
        pieces = []
        for proj, k, n, prefix, index in (
            (gate, h, i, "gate_up", 0),
            (up, h, i, "gate_up", 1),
            (down, i, h, "down", 0),
        ):
            qweight, g = ((k, n // 8) if awq else (k // 8, n)), self.groups[prefix]
            for part, shape, dtypes, tag in (
                ("qweight", qweight, (torch.int32,), "awq" if awq else None),
                ("qzeros", (k // g, n // 8), (torch.int32,), zeros_tag),
                ("scales", (k // g, n), (torch.float16, torch.bfloat16, torch.float32), None),
            ):
                numel = self.part(f"{prefix}_{part}").numel // (2 if prefix == "gate_up" else 1)
                pieces.append(
                    Piece(f"{prefix}_{part}", index * numel, f"{proj}.{part}", shape, dtypes=dtypes, tag=tag)
                )
        return pieces

    def ignored(self, name: str) -> bool:
        # g_idx is every input's group, k // G without act-order (desc_act), which the config refused
        return self.source != "awq" and name.endswith(".g_idx")

    def put(self, views: dict, piece: Piece, values: torch.Tensor) -> None:
        if piece.tag == "zeros_minus_one":
            values = pack_cols((unpack_cols(values) + 1) & 15)
        elif piece.tag == "awq" and piece.part.endswith("qweight"):
            values = pack_rows(unpack_cols(values, AWQ_ORDER))
        elif piece.tag == "awq":  # qzeros: the same words, in GPTQ's nibble order
            values = pack_cols(unpack_cols(values, AWQ_ORDER))
        super().put(views, piece, values)

    def fill_weights(self, expert: torch.Tensor, generator: torch.Generator, std: float) -> None:
        h, i, dev = self.hidden, self.inter, generator.device
        views = self.views(expert[None])
        gate_up = torch.randn(2, i, h, generator=generator, device=dev) * std
        down = torch.randn(h, i, generator=generator, device=dev) * std
        for prefix, w in (("gate_up", gate_up), ("down", down)):
            q, zeros, scales = quantize_groups(w, self.groups[prefix])
            views[f"{prefix}_qweight"][0].copy_(pack_rows(q))
            views[f"{prefix}_qzeros"][0].copy_(pack_cols(zeros))
            views[f"{prefix}_scales"][0].copy_(scales)

    def dequantize(self, bank: dict, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, i = slots.numel(), self.hidden, self.inter

        def proj(prefix):
            q = unpack_rows(bank[f"{prefix}_qweight"][slots])
            zeros = unpack_cols(bank[f"{prefix}_qzeros"][slots])
            return dequantize_groups(q, zeros, bank[f"{prefix}_scales"][slots], self.dtype)

        return proj("gate_up").reshape(n, 2 * i, h), proj("down")


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # the ranges searched by the error-minimising scales


def search_clip(w: torch.Tensor, group: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per group of w [..., N, K], the range shrink (of ratios) whose round-to-nearest quantization has
    the least squared error (llama.cpp's and AWQ's clip search, on the weights alone): [..., N, K / G]."""
    best = torch.ones(*w.shape[:-1], w.shape[-1] // group, device=w.device)
    best_err = torch.full_like(best, float("inf"))
    for ratio in ratios:
        clip = torch.full_like(best, ratio)
        q, zeros, scales = quantize_groups(w, group, clip)
        err = (dequantize_groups(q, zeros, scales.half(), torch.float32) - w.float()).square()
        err = err.unflatten(-1, (-1, group)).sum(-1)
        better = err < best_err
        best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
    return best


class GptqWriter:
    """Writes experts as published GPTQ 4-bit checkpoints store them (AutoGPTQ's v1 layout: zeros minus
    one, fp16 scales, g_idx; asymmetric, no act-order), so other GPTQ loaders read them too. scales: "rtn"
    (round to nearest over each group's full range) or "mse" (search_clip)."""

    name = "int4"

    def __init__(self, group: int = 128, scales: str = "mse"):
        self.group, self.scales = group, scales
        self.config = {
            "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False,
            "checkpoint_format": "gptq", "tiermoe_scales": scales,
        }  # fmt: skip

    def specs(self, base: str, out_features: int, in_features: int) -> list[tuple[str, torch.dtype, tuple]]:
        n, k, g = out_features, in_features, self.group
        return [
            (f"{base}.qweight", torch.int32, (k // 8, n)),
            (f"{base}.qzeros", torch.int32, (k // g, n // 8)),
            (f"{base}.scales", torch.float16, (k // g, n)),
            (f"{base}.g_idx", torch.int32, (k,)),
        ]

    def quantize(self, base: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        clip = search_clip(w, self.group) if self.scales == "mse" else None
        q, zeros, scales = quantize_groups(w, self.group, clip)
        return {
            f"{base}.qweight": pack_rows(q),
            f"{base}.qzeros": pack_cols((zeros - 1) & 15),
            f"{base}.scales": scales.half(),
            f"{base}.g_idx": torch.arange(w.shape[-1], dtype=torch.int32, device=w.device) // self.group,
        }
