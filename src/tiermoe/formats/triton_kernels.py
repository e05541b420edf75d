"""Triton kernels of the quantized formats' decode path: a grouped GEMV over a step's (token, expert)
pairs straight from the bank of expert slots, dequantization fused (int4 in the GPTQ layout, fp8 with
block scales): each program reads its pair's quantized weights once and never writes them out.

Imported only where used (CUDA, or the tests with TRITON_INTERPRET=1 set before the import), since triton
decides at decoration whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _int4_gemv(
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


@triton.jit
def _fp8_gemv(
    x_ptr, row_ptr, slot_ptr, w_ptr, s_ptr, out_ptr,
    slot_stride_w, slot_stride_s,
    K: tl.constexpr, N: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[p, m, n] = sum_k x[row[p], k] * w_m[n, k] * s_m[n // BO, k // BI] of the expert in slot[p]
    (w e4m3 [N, K], out x in, row-major; BLOCK_K divides BI)."""
    p, nb, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + p).to(tl.int64)
    row = tl.load(row_ptr + p).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    w = w_ptr + slot * slot_stride_w + m * (N * K)
    s = s_ptr + slot * slot_stride_s + m * (tl.cdiv(N, BO) * tl.cdiv(K, BI))
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        tile = tl.load(w + rows[:, None] * K + ks[None, :], mask=live[:, None] & (ks < K)[None, :], other=0)
        tile = tile.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        scale = tl.load(s + (rows // BO) * tl.cdiv(K, BI) + k0 // BI, mask=live, other=0.0)
        acc += scale * tl.sum(tile * x[None, :], axis=1)
    tl.store(out_ptr + (p * M + m) * N + rows, acc, mask=live)


def _divisor(n: int) -> int:
    return next(b for b in (128, 64, 32, 16, 8) if n % b == 0)


BLOCK_N = 64


def _int4_project(fmt, x, rows, slots, bank, prefix: str, k: int, n: int, m: int) -> torch.Tensor:
    qw, qz, sc = (bank[f"{prefix}_{part}"] for part in ("qweight", "qzeros", "scales"))
    group = fmt.groups[prefix]
    out = torch.empty(slots.numel(), m, n, dtype=torch.float32, device=x.device)
    _int4_gemv[(slots.numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), rows, slots, qw, qz, sc, out, qw.stride(0), qz.stride(0), sc.stride(0),
        K=k, N=n, G=group, M=m, BLOCK_K=_divisor(group), BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out


def _fp8_project(fmt, x, rows, slots, bank, prefix: str, k: int, n: int, m: int) -> torch.Tensor:
    w, s = bank[prefix].view(torch.uint8), bank[f"{prefix}_scale"]
    out = torch.empty(slots.numel(), m, n, dtype=torch.float32, device=x.device)
    bo, bi = fmt.block
    _fp8_gemv[(slots.numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), rows, slots, w, s, out, w.stride(0), s.stride(0),
        K=k, N=n, BO=bo, BI=bi, M=m, BLOCK_K=min(_divisor(bi), 128), BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out


def _mlp(project, fmt, x, slots, weights, bank) -> torch.Tensor:
    """The format's mlp (x [T, H], slots and weights [T, k]) by grouped GEMVs: gate and up of every pair
    in one launch, SiLU-and-multiply, down in a second; no host synchronisation."""
    t, k = slots.shape
    h, i = fmt.hidden, fmt.inter
    pairs = slots.reshape(-1).contiguous()
    rows = torch.arange(t, device=x.device).repeat_interleave(k)
    gate_up = project(fmt, x, rows, pairs, bank, "gate_up", h, i, 2)  # [P, 2, I] float32
    act = F.silu(gate_up[:, 0]) * gate_up[:, 1]  # [P, I]
    down = project(fmt, act, torch.arange(t * k, device=x.device), pairs, bank, "down", i, h, 1)
    return (down.view(t, k, h) * weights[:, :, None].float()).sum(dim=1).to(x.dtype)


def int4_mlp(fmt, x, slots, weights, bank) -> torch.Tensor:
    return _mlp(_int4_project, fmt, x, slots, weights, bank)


def fp8_mlp(fmt, x, slots, weights, bank) -> torch.Tensor:
    return _mlp(_fp8_project, fmt, x, slots, weights, bank)
