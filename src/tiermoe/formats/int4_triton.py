"""Triton kernels of the int4 format (GPTQ layout): a grouped GEMV over (token, expert) pairs, the
decode path, with dequantization fused: each program reads one pair's 4-bit weights once and never
writes them out dequantized.

Imported only where used (CUDA, or the tests with TRITON_INTERPRET=1 set before the import), since triton
decides at decoration whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _gemv(
    x_ptr, row_ptr, slot_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr,
    slot_stride_qw, slot_stride_qz, slot_stride_sc,
    K: tl.constexpr, N: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[p, m, n] = sum_k x[row[p], k] * w_m[k, n] of the expert in slot[p], w = s * (q - z): one
    program per (pair, block of N outputs, stacked matrix m)."""
    p, nb, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + p).to(tl.int64)
    row = tl.load(row_ptr + p).to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cols < N
    qw = qw_ptr + slot * slot_stride_qw + m * (K // 8 * N)
    qz = qz_ptr + slot * slot_stride_qz + m * (K // G * (N // 8))
    sc = sc_ptr + slot * slot_stride_sc + m * (K // G * N)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * K + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)  # [BLOCK_K]
        words = tl.load(
            qw + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None] * N + cols[None, :],
            mask=live[None, :],
            other=0,
        )
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 15, (BLOCK_K, BLOCK_N)).to(tl.float32)
        g = k0 // G  # BLOCK_K divides G: one group per step
        s = tl.load(sc + g * N + cols, mask=live, other=0.0).to(tl.float32)
        z = ((tl.load(qz + g * (N // 8) + cols // 8, mask=live, other=0) >> ((cols % 8) * 4)) & 15).to(
            tl.float32
        )
        # sum_k x_k s (q_kn - z) = s (sum_k x_k q_kn - z sum_k x_k)
        acc += s * (tl.sum(x[:, None] * q, axis=0) - z * tl.sum(x))
    tl.store(out_ptr + (p * M + m) * N + cols, acc, mask=live)


def _block_k(group: int) -> int:
    return next(b for b in (128, 64, 32, 16, 8) if group % b == 0)


def _project(x, rows, slots, bank, prefix: str, k: int, n: int, group: int, m: int) -> torch.Tensor:
    """[P, m, n] float32: every pair's x[rows[p]] [k] through its expert's `prefix` matrices."""
    qw, qz, sc = (bank[f"{prefix}_{part}"] for part in ("qweight", "qzeros", "scales"))
    out = torch.empty(slots.numel(), m, n, dtype=torch.float32, device=x.device)
    block_n = 64
    grid = (slots.numel(), triton.cdiv(n, block_n), m)
    _gemv[grid](
        x.contiguous(), rows, slots, qw, qz, sc, out, qw.stride(0), qz.stride(0), sc.stride(0),
        K=k, N=n, G=group, M=m, BLOCK_K=_block_k(group), BLOCK_N=block_n,
    )  # fmt: skip
    return out


def int4_mlp(fmt, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, bank: dict) -> torch.Tensor:
    """The format's mlp (x [T, H], slots and weights [T, k]) by the grouped GEMV: gate and up of every
    pair in one launch, SiLU-and-multiply, down in a second; no host synchronisation."""
    t, k = slots.shape
    h, i = fmt.hidden, fmt.inter
    pairs = slots.reshape(-1).contiguous()
    rows = torch.arange(t, device=x.device).repeat_interleave(k)
    gate_up = _project(x, rows, pairs, bank, "gate_up", h, i, fmt.groups["gate_up"], 2)  # [P, 2, I]
    act = F.silu(gate_up[:, 0]) * gate_up[:, 1]  # [P, I] float32
    down = _project(
        act, torch.arange(t * k, device=x.device), pairs, bank, "down", i, h, fmt.groups["down"], 1
    )
    return (down.view(t, k, h) * weights[:, :, None].float()).sum(dim=1).to(x.dtype)
