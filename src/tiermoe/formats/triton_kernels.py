"""Triton kernels of the quantized formats (int4 in the GPTQ layout, fp8 with block scales, NVFP4 and
MXFP4), reading the quantized weights straight from the bank of expert slots with dequantization fused,
never writing them out.

Decode: a grouped GEMV over a step's (token, expert) pairs (one program per pair, block of outputs and
split of K; no host synchronisation), in three launches per MoE layer: gate and up; down, which reads
the GLU of gate and up (SiLU(gate) x up, or gpt-oss's clamped one) from the first one's partial sums
and scales by the routing weight; the sum over each token's pairs. Biases (gpt-oss) are added where each
projection's outputs are stored. A graph replays each launch in a few microseconds, so at batch 1 the
launches, not the bytes, set the time of a layer unless there are few of them.
Prefill and large batches: a grouped GEMM over the pairs sorted by expert (one program per block of an
expert's tokens and block of outputs, each weight tile read once for up to BLOCK_M tokens).

Imported only where used (CUDA, or the tests with TRITON_INTERPRET=1 set before the import), since triton
decides at decoration whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..config import user_cache_dir
from ..models.fused import INTERPRETED
from .fp4 import GROUP as NVFP4_GROUP
from .mxfp4 import GROUP as MXFP4_GROUP


@triton.jit
def _load(ptr, mask):
    """tl.load, masked (zeros outside) when a mask is given."""
    # Statement ifs on compile-time constants, one return at the end: the forms Triton's compiler takes.
    if mask is None:  # noqa: SIM108
        value = tl.load(ptr)
    else:
        value = tl.load(ptr, mask=mask, other=0.0)
    return value


@triton.jit
def _glu(gate, up, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """SiLU(gate) x up, or with LIMIT gpt-oss's clamped gate x sigmoid(ALPHA x gate) x (up + 1)."""
    if LIMIT is None:  # SwiGLU: the plain kernels compile as they did before kinds
        value = gate / (1.0 + tl.exp(-gate)) * up
    else:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        value = gate / (1.0 + tl.exp(-ALPHA * gate)) * (up + 1.0)
    return value


@triton.jit
def _gemv_input(
    x_ptr, p, offs, mask, K: tl.constexpr, TOPK: tl.constexpr, ACT_SPLIT: tl.constexpr,
    LIMIT: tl.constexpr, ALPHA: tl.constexpr,
):  # fmt: skip
    """Pair p's inputs at offsets `offs` (any shape) as float32: its token's row of x [T, K] (pair p
    belongs to token p // TOPK), or, when ACT_SPLIT > 0, the GLU of gate and up from the gate_up GEMV's
    output [P, 2, ACT_SPLIT, K] (its K splits summed here, so neither the sum nor the activation is a
    launch): SiLU(gate) x up, or with LIMIT gpt-oss's clamped gate x sigmoid(ALPHA x gate) x (up + 1)."""
    if ACT_SPLIT == 0:
        value = _load(x_ptr + (p // TOPK) * K + offs, mask).to(tl.float32)
    else:
        base = x_ptr + p * (2 * ACT_SPLIT * K) + offs
        gate = _load(base, mask)
        up = _load(base + ACT_SPLIT * K, mask)
        for s in tl.static_range(1, ACT_SPLIT):
            gate += _load(base + s * K, mask)
            up += _load(base + (ACT_SPLIT + s) * K, mask)
        value = _glu(gate, up, LIMIT, ALPHA)
    return value


@triton.jit
def _gemv_store(
    out_ptr, w_ptr, base, p, m, sp, cols, live, acc,
    N: tl.constexpr, M: tl.constexpr, SPLIT: tl.constexpr, WEIGHTED: tl.constexpr,
    BIAS: tl.constexpr, BIAS_DT: tl.constexpr,
):  # fmt: skip
    """out[p, m, sp, cols] = acc, plus the projection's bias when it has one (at byte offset BIAS of the
    expert, [M, N] of type BIAS_DT), times pair p's routing weight when WEIGHTED (the down projection).
    Split 0 alone adds the bias, so the splits' sum holds it once: each bias value is read once a pair
    here, where the gate_up output's reader would read it again for every block of its outputs."""
    # The compile-time test apart from the run-time one: without a bias no branch is compiled at all.
    if BIAS is not None:  # noqa: SIM102
        if sp == 0:
            acc += tl.load(_part(base, BIAS, BIAS_DT) + m * N + cols, mask=live, other=0.0).to(tl.float32)
    if WEIGHTED:
        acc *= tl.load(w_ptr + p).to(tl.float32)
    tl.store(out_ptr + ((p * M + m) * SPLIT + sp) * N + cols, acc, mask=live)


@triton.jit
def _expert(table_ptr, id_ptr, p):
    """Pair p's expert as a byte pointer: the address the table holds for the pair's id (a GPU slot, or
    pinned host memory the kernel reads in place)."""
    return tl.load(table_ptr + tl.load(id_ptr + p).to(tl.int64)).to(tl.pointer_type(tl.uint8))


@triton.jit
def _part(base, OFFSET: tl.constexpr, DT: tl.constexpr):
    """A part of an expert (its byte offset in the format's layout) as a pointer to DT."""
    return (base + OFFSET).to(tl.pointer_type(DT))


@triton.jit
def _int4_gemv(
    x_ptr, id_ptr, table_ptr, w_ptr, out_ptr,
    QW: tl.constexpr, QZ: tl.constexpr, SC: tl.constexpr, SC_DT: tl.constexpr,
    K: tl.constexpr, N: tl.constexpr, G: tl.constexpr, M: tl.constexpr, SPLIT: tl.constexpr,
    TOPK: tl.constexpr, ACT_SPLIT: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr, BIAS_DT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
):  # fmt: skip
    """out[p, m, sp, n] = sum_k x_p[k] * w_m[k, n] over split sp's K / SPLIT inputs, for pair p's expert,
    w = s * (q - z): one program per (pair, block of N outputs, stacked matrix m and split sp). QW, QZ, SC:
    byte offsets of the projection's packed weights, zeros and scales (of type SC_DT) in an expert."""
    p, nb, ms = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m, sp = ms // SPLIT, ms % SPLIT
    base = _expert(table_ptr, id_ptr, p)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = cols < N
    qw = _part(base, QW, tl.int32) + m * (K // 8 * N)
    qz = _part(base, QZ, tl.int32) + m * (K // G * (N // 8))
    sc = _part(base, SC, SC_DT) + m * (K // G * N)
    # GPTQ packs inputs 8r .. 8r + 7 into word row r, input 8r + j in bits 4j .. 4j + 3: tiles stay
    # [BLOCK_K / 8, 8, BLOCK_N] (word row, nibble, output) and are summed over both input axes, never
    # reshaped to [BLOCK_K, BLOCK_N] (a layout conversion through shared memory per tile).
    r8, j = tl.arange(0, BLOCK_K // 8), tl.arange(0, 8)
    shifts = j * 4
    # Products accumulate elementwise and are summed once after the loop: a sum across warps inside it
    # costs a trip through shared memory and barriers every step.
    acc = tl.zeros((BLOCK_K // 8, 8, BLOCK_N), dtype=tl.float32)
    for k0 in range(sp * (K // SPLIT), (sp + 1) * (K // SPLIT), BLOCK_K):
        x = _gemv_input(
            x_ptr, p, k0 + r8[:, None] * 8 + j[None, :], None, K, TOPK, ACT_SPLIT, LIMIT, ALPHA
        )  # [BLOCK_K / 8, 8]
        words = tl.load(qw + (k0 // 8 + r8)[:, None] * N + cols[None, :], mask=live[None, :], other=0)
        q = ((words[:, None, :] >> shifts[None, :, None]) & 15).to(tl.float32)  # [BLOCK_K / 8, 8, BLOCK_N]
        g = k0 // G  # BLOCK_K divides G: one group per step
        s = tl.load(sc + g * N + cols, mask=live, other=0.0).to(tl.float32)
        z = ((tl.load(qz + g * (N // 8) + cols // 8, mask=live, other=0) >> ((cols % 8) * 4)) & 15).to(
            tl.float32
        )
        acc += x[:, :, None] * ((q - z[None, None, :]) * s[None, None, :])
    out = tl.sum(tl.sum(acc, axis=1), axis=0)
    _gemv_store(out_ptr, w_ptr, base, p, m, sp, cols, live, out, N, M, SPLIT, WEIGHTED, BIAS, BIAS_DT)


@triton.jit
def _fp8_gemv(
    x_ptr, id_ptr, table_ptr, w_ptr, out_ptr,
    W: tl.constexpr, S: tl.constexpr, FP8_NATIVE: tl.constexpr,
    K: tl.constexpr, N: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, M: tl.constexpr,
    SPLIT: tl.constexpr, TOPK: tl.constexpr, ACT_SPLIT: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr, BIAS_DT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
):  # fmt: skip
    """out[p, m, sp, n] = sum_k x_p[k] * w_m[n, k] * s_m[n // BO, k // BI] over split sp's inputs, for the
    pair's expert (w e4m3 [N, K], out x in, row-major, at byte offset W; float32 scales at S; BLOCK_K
    divides BI)."""
    p, nb, ms = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m, sp = ms // SPLIT, ms % SPLIT
    base = _expert(table_ptr, id_ptr, p)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    w = _part(base, W, tl.uint8) + m * (N * K)
    s = _part(base, S, tl.float32) + m * (tl.cdiv(N, BO) * tl.cdiv(K, BI))
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed once after the loop (as in _int4_gemv)
    for k0 in range(sp * (K // SPLIT), (sp + 1) * (K // SPLIT), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _gemv_input(x_ptr, p, ks, ks < K, K, TOPK, ACT_SPLIT, LIMIT, ALPHA)
        tile = tl.load(w + rows[:, None] * K + ks[None, :], mask=live[:, None] & (ks < K)[None, :], other=0)
        tile = _e4m3(tile, FP8_NATIVE)  # [BLOCK_N, BLOCK_K]
        scale = tl.load(s + (rows // BO) * tl.cdiv(K, BI) + k0 // BI, mask=live, other=0.0)
        acc += tile * (x[None, :] * scale[:, None])
    _gemv_store(
        out_ptr, w_ptr, base, p, m, sp, rows, live, tl.sum(acc, axis=1), N, M, SPLIT, WEIGHTED, BIAS, BIAS_DT
    )


@triton.jit
def _dense_gemv(
    x_ptr, id_ptr, table_ptr, w_ptr, out_ptr,
    W: tl.constexpr, W_DT: tl.constexpr,
    K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, SPLIT: tl.constexpr, TOPK: tl.constexpr,
    ACT_SPLIT: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr, BIAS_DT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
):  # fmt: skip
    """out[p, m, sp, n] = sum_k x_p[k] * w_m[n, k] over split sp's inputs for pair p's expert, w of type
    W_DT [N, K] (out x in, row-major) at byte offset W: the unquantized experts read in place, where torch
    would first gather the chosen experts' weights into a copy."""
    p, nb, ms = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m, sp = ms // SPLIT, ms % SPLIT
    base = _expert(table_ptr, id_ptr, p)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    w = _part(base, W, W_DT) + m * (N * K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed once after the loop (as in _int4_gemv)
    for k0 in range(sp * (K // SPLIT), (sp + 1) * (K // SPLIT), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _gemv_input(x_ptr, p, ks, ks < K, K, TOPK, ACT_SPLIT, LIMIT, ALPHA)
        tile = tl.load(w + rows[:, None] * K + ks[None, :], mask=live[:, None] & (ks < K)[None, :], other=0.0)
        acc += tile.to(tl.float32) * x[None, :]
    _gemv_store(
        out_ptr, w_ptr, base, p, m, sp, rows, live, tl.sum(acc, axis=1), N, M, SPLIT, WEIGHTED, BIAS, BIAS_DT
    )


@triton.jit
def _e4m3(byte, NATIVE: tl.constexpr):
    """float32 values of e4m3fn bytes: the GPU's own conversion where it has one (sm_89 and later, and
    the interpreter), else from the bits (sign 7, exponent 3-6 with bias 7, mantissa 0-2; subnormal at
    exponent 0). NaN codes are not decoded: weights and scales never hold them."""
    if NATIVE:
        value = byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        b = byte.to(tl.int32)
        e = (b >> 3) & 15
        mant = (b & 7).to(tl.float32)
        mag = tl.where(e == 0, mant * 0.001953125, (1.0 + mant * 0.125) * tl.exp2((e - 7).to(tl.float32)))
        value = tl.where((b & 128) != 0, -mag, mag)
    return value


@triton.jit
def _e2m1(code):
    """float32 value of e2m1 codes (int32, 0..15): sign in bit 3, exponent in bits 1-2, mantissa bit 0."""
    e = (code >> 1) & 3
    mant = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, mant * 0.5, (1.0 + mant * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _fp4_scale(s, E8M0: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """float32 block scales from their bytes: e8m0 (MXFP4, 2^(s - 127)) or e4m3 (NVFP4)."""
    if E8M0:  # noqa: SIM108 (as in _load)
        scale = tl.exp2(s.to(tl.float32) - 127.0)
    else:
        scale = _e4m3(s, FP8_NATIVE)
    return scale


@triton.jit
def _fp4_gemv(
    x_ptr, id_ptr, table_ptr, w_ptr, out_ptr,
    W: tl.constexpr, S: tl.constexpr, G: tl.constexpr, FP8_NATIVE: tl.constexpr,
    K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, SPLIT: tl.constexpr, GS: tl.constexpr,
    E8M0: tl.constexpr, GLOBAL: tl.constexpr, TOPK: tl.constexpr, ACT_SPLIT: tl.constexpr,
    WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS: tl.constexpr, BIAS_DT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
):  # fmt: skip
    """out[p, m, sp, n] = sum_k x_p[k] * w_m[n, k] over split sp's inputs for pair p's expert: w e2m1
    [N, K / 2] bytes at byte offset W (input 2 j in the low nibble of byte j) times a one-byte scale per GS
    inputs [N, K / GS] at S (and NVFP4's float32 scale per matrix at G when GLOBAL). Tiles stay
    [BLOCK_N, blocks, GS / 2] bytes, the even and odd inputs multiplied apart: no interleaving reshape."""
    p, nb, ms = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m, sp = ms // SPLIT, ms % SPLIT
    base = _expert(table_ptr, id_ptr, p)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    w = _part(base, W, tl.uint8) + m * (N * (K // 2))
    s = _part(base, S, tl.uint8) + m * (N * (K // GS))
    b, t = tl.arange(0, BLOCK_K // GS), tl.arange(0, GS // 2)
    acc = tl.zeros((BLOCK_N, BLOCK_K // GS, GS // 2), dtype=tl.float32)  # summed once after the loop
    for k0 in range(sp * (K // SPLIT), (sp + 1) * (K // SPLIT), BLOCK_K):
        offsets = rows[:, None, None] * (K // 2) + k0 // 2 + b[None, :, None] * (GS // 2) + t[None, None, :]
        codes = tl.load(w + offsets, mask=live[:, None, None], other=0).to(
            tl.int32
        )  # [BLOCK_N, blocks, GS/2]
        xs = k0 + b[:, None] * GS + 2 * t[None, :]
        even = _gemv_input(x_ptr, p, xs, None, K, TOPK, ACT_SPLIT, LIMIT, ALPHA)  # [blocks, GS / 2]
        odd = _gemv_input(x_ptr, p, xs + 1, None, K, TOPK, ACT_SPLIT, LIMIT, ALPHA)
        sc = tl.load(s + rows[:, None] * (K // GS) + k0 // GS + b[None, :], mask=live[:, None], other=0)
        scale = _fp4_scale(sc, E8M0, FP8_NATIVE)[:, :, None]  # [BLOCK_N, blocks, 1]
        acc += (_e2m1(codes & 15) * even[None] + _e2m1(codes >> 4) * odd[None]) * scale
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if GLOBAL:
        out *= tl.load(_part(base, G, tl.float32) + m)
    _gemv_store(out_ptr, w_ptr, base, p, m, sp, rows, live, out, N, M, SPLIT, WEIGHTED, BIAS, BIAS_DT)


@triton.jit
def _gemm_block(
    blk_slot_ptr, blk_start_ptr, blk_end_ptr, tok_ptr, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """This GEMM program's expert slot, sorted pair rows (and which are live), their tokens, its output
    columns (and which are live: none in an empty block, so that it reads no weights), stacked matrix m
    and where its loop over the K inputs stops (0 in an empty block: it computes nothing)."""
    b, nb, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(blk_slot_ptr + b).to(tl.int64)
    start, end = tl.load(blk_start_ptr + b), tl.load(blk_end_ptr + b)
    rows = start + tl.arange(0, BLOCK_M)
    live_r = rows < end
    tok = tl.load(tok_ptr + rows, mask=live_r, other=0).to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    live = (start < end).to(tl.int32)
    return slot, rows, live_r, tok, cols, cols < N * live, m, K * live


@triton.jit
def _gemm_input(x_ptr, tok, offs, mask, K, GLU: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """The GEMM's input tile [BLOCK_M, len(offs)]: rows tok of x [*, K] at columns offs, or with GLU the
    kind's GLU of gate and up read from the gate_up GEMM's output [P, 2, K] (float32), so the activation
    is no launch of its own."""
    if GLU:
        base = x_ptr + tok[:, None] * (2 * K) + offs[None, :]
        gate = tl.load(base, mask=mask, other=0.0)
        up = tl.load(base + K, mask=mask, other=0.0)
        value = _glu(gate, up, LIMIT, ALPHA)
    else:
        value = tl.load(x_ptr + tok[:, None] * K + offs[None, :], mask=mask, other=0.0)
    return value


@triton.jit
def _gemm_store(
    out_ptr, b_ptr, slot, slot_stride_b, rows, live_r, cols, live_c, m, acc, dst_ptr, rw_ptr,
    N: tl.constexpr, M: tl.constexpr, BIAS: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """out[rows, m, cols] = acc, plus the block's expert's bias (b [S, M * N], slot `slot`) when BIAS; with
    SCATTER, at the pairs' own rows dst[rows] instead, times their routing weights rw[dst[rows]]."""
    if BIAS:
        bias = tl.load(b_ptr + slot * slot_stride_b + m * N + cols, mask=live_c, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SCATTER:
        rows = tl.load(dst_ptr + rows, mask=live_r, other=0)
        acc *= tl.load(rw_ptr + rows, mask=live_r, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + (rows[:, None] * M + m) * N + cols[None, :], acc, mask=live_r[:, None] & live_c[None, :]
    )


@triton.jit
def _dense_gemm(
    x_ptr, tok_ptr, blk_slot_ptr, blk_start_ptr, blk_end_ptr, w_ptr, out_ptr, b_ptr, slot_stride_w, slot_stride_b,
    dst_ptr, rw_ptr, K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, EXACT: tl.constexpr, BIAS: tl.constexpr,
    GLU: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """out[r, m, :] = x[tok[r]] @ w_m^T of the block's expert, w_m [N, K] row-major (unquantized experts).
    EXACT: float32 products (fp32 experts, and Triton's interpreter, whose bf16 dot is broken)."""
    slot, rows, live_r, tok, cols, live_c, m, k_stop = _gemm_block(
        blk_slot_ptr, blk_start_ptr, blk_end_ptr, tok_ptr, N, K, BLOCK_M, BLOCK_N
    )
    w = w_ptr + slot * slot_stride_w + m * (N * K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _gemm_input(x_ptr, tok, ks, live_r[:, None] & (ks < K)[None, :], K, GLU, LIMIT, ALPHA)
        tile = tl.load(
            w + cols[None, :] * K + ks[:, None], mask=live_c[None, :] & (ks < K)[:, None], other=0.0
        )
        if EXACT:
            acc += tl.dot(a.to(tl.float32), tile.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(tile.dtype), tile)
    _gemm_store(
        out_ptr, b_ptr, slot, slot_stride_b, rows, live_r, cols, live_c, m, acc,
        dst_ptr, rw_ptr, N, M, BIAS, SCATTER,
    )  # fmt: skip


@triton.jit
def _int4_gemm(
    x_ptr, tok_ptr, blk_slot_ptr, blk_start_ptr, blk_end_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, b_ptr,
    slot_stride_qw, slot_stride_qz, slot_stride_sc, slot_stride_b, dst_ptr, rw_ptr,
    K: tl.constexpr, N: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    BIAS: tl.constexpr,
    GLU: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """out[r, m, :] = x[tok[r]] @ w_m of the block's expert, for the sorted pairs r of block b."""
    slot, rows, live_r, tok, cols, live_c, m, k_stop = _gemm_block(
        blk_slot_ptr, blk_start_ptr, blk_end_ptr, tok_ptr, N, K, BLOCK_M, BLOCK_N
    )
    qw = qw_ptr + slot * slot_stride_qw + m * (K // 8 * N)
    qz = qz_ptr + slot * slot_stride_qz + m * (K // G * (N // 8))
    sc = sc_ptr + slot * slot_stride_sc + m * (K // G * N)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        a = _gemm_input(x_ptr, tok, k0 + tl.arange(0, BLOCK_K), live_r[:, None], K, GLU, LIMIT, ALPHA)
        words = tl.load(
            qw + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None] * N + cols[None, :],
            mask=live_c[None, :],
            other=0,
        )
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 15, (BLOCK_K, BLOCK_N)).to(tl.float32)
        g = k0 // G
        s = tl.load(sc + g * N + cols, mask=live_c, other=0.0).to(tl.float32)
        z = ((tl.load(qz + g * (N // 8) + cols // 8, mask=live_c, other=0) >> ((cols % 8) * 4)) & 15).to(
            tl.float32
        )
        w = (q - z[None, :]) * s[None, :]  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:  # Triton's interpreter: its bf16 dot is broken
            acc += tl.dot(a.to(tl.float32), w)
        else:
            acc += tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16))
    _gemm_store(
        out_ptr, b_ptr, slot, slot_stride_b, rows, live_r, cols, live_c, m, acc,
        dst_ptr, rw_ptr, N, M, BIAS, SCATTER,
    )  # fmt: skip


@triton.jit
def _fp8_gemm(
    x_ptr, tok_ptr, blk_slot_ptr, blk_start_ptr, blk_end_ptr, w_ptr, s_ptr, out_ptr, b_ptr,
    slot_stride_w, slot_stride_s, slot_stride_b, dst_ptr, rw_ptr,
    K: tl.constexpr, N: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_NATIVE: tl.constexpr, BIAS: tl.constexpr,
    GLU: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    slot, rows, live_r, tok, cols, live_c, m, k_stop = _gemm_block(
        blk_slot_ptr, blk_start_ptr, blk_end_ptr, tok_ptr, N, K, BLOCK_M, BLOCK_N
    )
    w = w_ptr + slot * slot_stride_w + m * (N * K)
    s = s_ptr + slot * slot_stride_s + m * (tl.cdiv(N, BO) * tl.cdiv(K, BI))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _gemm_input(x_ptr, tok, ks, live_r[:, None] & (ks < K)[None, :], K, GLU, LIMIT, ALPHA)
        tile = tl.load(w + cols[None, :] * K + ks[:, None], mask=live_c[None, :] & (ks < K)[:, None], other=0)
        scale = tl.load(s + (cols // BO) * tl.cdiv(K, BI) + k0 // BI, mask=live_c, other=0.0)
        wt = _e4m3(tile, FP8_NATIVE) * scale[None, :]  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), wt)
        else:
            acc += tl.dot(a.to(tl.bfloat16), wt.to(tl.bfloat16))
    _gemm_store(
        out_ptr, b_ptr, slot, slot_stride_b, rows, live_r, cols, live_c, m, acc,
        dst_ptr, rw_ptr, N, M, BIAS, SCATTER,
    )  # fmt: skip


@triton.jit
def _fp4_gemm(
    x_ptr, tok_ptr, blk_slot_ptr, blk_start_ptr, blk_end_ptr, w_ptr, s_ptr, g_ptr, out_ptr, b_ptr,
    slot_stride_w, slot_stride_s, slot_stride_g, slot_stride_b, dst_ptr, rw_ptr,
    K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, GS: tl.constexpr, E8M0: tl.constexpr,
    GLOBAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, FP8_NATIVE: tl.constexpr, BIAS: tl.constexpr,
    GLU: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """out[r, m, :] = x[tok[r]] @ w_m^T of the block's expert: the even inputs' dot with the low nibbles
    plus the odd inputs' with the high ones, each [BLOCK_K / 2, BLOCK_N] tile scaled per input."""
    slot, rows, live_r, tok, cols, live_c, m, k_stop = _gemm_block(
        blk_slot_ptr, blk_start_ptr, blk_end_ptr, tok_ptr, N, K, BLOCK_M, BLOCK_N
    )
    w = w_ptr + slot * slot_stride_w + m * (N * (K // 2))
    s = s_ptr + slot * slot_stride_s + m * (N * (K // GS))
    t = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        even = _gemm_input(
            x_ptr, tok, k0 + 2 * t, live_r[:, None], K, GLU, LIMIT, ALPHA
        )  # [BLOCK_M, BLOCK_K / 2]
        odd = _gemm_input(x_ptr, tok, k0 + 2 * t + 1, live_r[:, None], K, GLU, LIMIT, ALPHA)
        codes = tl.load(w + cols[None, :] * (K // 2) + k0 // 2 + t[:, None], mask=live_c[None, :], other=0)
        codes = codes.to(tl.int32)  # [BLOCK_K / 2, BLOCK_N]
        sc = tl.load(
            s + cols[None, :] * (K // GS) + (k0 + 2 * t[:, None]) // GS, mask=live_c[None, :], other=0
        )
        scale = _fp4_scale(sc, E8M0, FP8_NATIVE)  # inputs 2t and 2t + 1 share a block: GS is even
        lo, hi = _e2m1(codes & 15) * scale, _e2m1(codes >> 4) * scale
        if DOT_FP32:
            acc += tl.dot(even.to(tl.float32), lo) + tl.dot(odd.to(tl.float32), hi)
        else:
            acc += tl.dot(even.to(tl.bfloat16), lo.to(tl.bfloat16)) + tl.dot(
                odd.to(tl.bfloat16), hi.to(tl.bfloat16)
            )
    if GLOBAL:
        acc *= tl.load(g_ptr + slot * slot_stride_g + m)
    _gemm_store(
        out_ptr, b_ptr, slot, slot_stride_b, rows, live_r, cols, live_c, m, acc,
        dst_ptr, rw_ptr, N, M, BIAS, SCATTER,
    )  # fmt: skip


@triton.jit
def _read_in_place(src_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[block] = the words at the address src_ptr holds: memory read in place (pinned host memory
    through its device-visible address, as miss_path in-place reads experts)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(src_ptr).to(tl.pointer_type(tl.int32))
    tl.store(out_ptr + offs, tl.load(src + offs))


def read_in_place(address: torch.Tensor, out: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Fill out (int32, a multiple of `block` words) from the memory at address (an int64 [1] tensor on
    out's device), as many programs as blocks."""
    _read_in_place[(out.numel() // block,)](address, out, BLOCK=block)
    return out


@triton.jit
def _plan_stage(
    table_ptr,
    host_ptr,
    id_ptr,
    n_pairs,
    cand_ptr,
    owner_ptr,
    lo,
    hi,
    row_bytes,
    staging_ptr,
    out_ptr,
    record_ptr,
    PAIRS: tl.constexpr,
    CANDS: tl.constexpr,
    ADMIT: tl.constexpr,
    RECORD: tl.constexpr,
):
    """One program over a layer's pairs (ids, n_pairs of them): where each reads its expert (out row 0),
    and the copies that put the missed ones there (row 1 the host source, 0 for none; row 2 the target).
    A missed expert is copied once, by its first pair, and its other pairs read the same copy. Its target
    is a staging row (the pair's), or with ADMIT a GPU slot, which then holds it for later steps: the
    candidates (slot indices, -1 padded, the policy's victims in order) that hold no expert routed here
    go to the missed experts in order; the table entry of each flips to its slot, the evicted expert's
    back to its host copy (host_ptr), and owner (expert of each slot, -1 free) follows. With RECORD the
    ids are also written to record_ptr (the host's count of the step, read after it)."""
    i = tl.arange(0, PAIRS)
    live = i < n_pairs
    e = tl.load(id_ptr + i, mask=live, other=-1)
    if RECORD:
        tl.store(record_ptr + i, e, mask=live)
    address = tl.load(table_ptr + e, mask=live, other=0)
    host = live & ((address < lo) | (address >= hi))
    same = (e[:, None] == e[None, :]) & live[None, :]  # [pair, pair]
    first = tl.min(tl.where(same, i[None, :], PAIRS), axis=1)  # each pair's first pair of its expert
    new = host & (first == i)
    target = staging_ptr + i.to(tl.int64) * row_bytes
    if ADMIT:
        c = tl.arange(0, CANDS)
        slot = tl.load(cand_ptr + c)
        owner = tl.load(owner_ptr + slot, mask=slot >= 0, other=-1)
        routed = (
            tl.sum(((owner[:, None] == e[None, :]) & live[None, :]).to(tl.int32), axis=1) > 0
        )  # [candidate]
        free = (slot >= 0) & ~routed
        rank = tl.cumsum(new.to(tl.int32), axis=0) - new.to(tl.int32)
        free_rank = tl.cumsum(free.to(tl.int32), axis=0) - free.to(tl.int32)
        match = new[:, None] & free[None, :] & (free_rank[None, :] == rank[:, None])  # [pair, candidate]
        admitted = tl.sum(match.to(tl.int32), axis=1) > 0
        chosen = tl.sum(tl.where(match, slot[None, :], 0), axis=1)
        evicted = tl.where(admitted, tl.sum(tl.where(match, owner[None, :], 0), axis=1), -1)
        slot_address = lo + chosen.to(tl.int64) * row_bytes
        target = tl.where(admitted, slot_address, target)
        tl.store(table_ptr + e, slot_address, mask=admitted)
        back = evicted >= 0
        tl.store(table_ptr + evicted, tl.load(host_ptr + evicted, mask=back, other=0), mask=back)
        tl.store(owner_ptr + chosen, e, mask=admitted)
    read = tl.where(host, target, address)
    read = tl.sum(tl.where(first[:, None] == i[None, :], read[None, :], 0), axis=1)  # its first pair's
    tl.store(out_ptr + i, read, mask=live)
    tl.store(out_ptr + PAIRS + i, tl.where(new, address, 0), mask=live)
    tl.store(out_ptr + 2 * PAIRS + i, target, mask=live)


@triton.jit
def _copy_rows(src_ptr, dst_ptr, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (p, b): words [b * BLOCK, (b + 1) * BLOCK) of row p from src[p] to dst[p] (addresses;
    src 0: nothing to copy), read through the device-visible address of pinned host memory."""
    p, b = tl.program_id(0), tl.program_id(1)
    src = tl.load(src_ptr + p)
    if src != 0:
        offs = b * BLOCK + tl.arange(0, BLOCK)
        live = offs < WORDS
        dst = tl.load(dst_ptr + p).to(tl.pointer_type(tl.int32))
        tl.store(dst + offs, tl.load(src.to(tl.pointer_type(tl.int32)) + offs, mask=live), mask=live)


STAGE_BLOCK = 4096  # words a staging program moves (16 KiB: a few hundred programs an expert)


def stage(
    table: torch.Tensor,
    ids: torch.Tensor,
    pool: torch.Tensor,
    staging: torch.Tensor,
    admit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    record: torch.Tensor | None = None,
) -> torch.Tensor:
    """The addresses (int64 [P]) each (token, expert) pair's kernels read its expert at, after copying
    every expert of ids ([T, k], flattened into P pairs) that lies outside the GPU slots `pool` (uint8
    [S, nbytes]) out of host memory by kernel reads of pinned memory, in one wide launch, with no host
    synchronisation (CUDA-graph safe). Each missed expert is copied once: into the staging row (uint8
    [at least P, nbytes]) of its first pair, or with admit = (host int64 [E], the layer's host addresses;
    candidates int64 [C], C a power of two; owner int64 [S]) into a victim slot, the table and owner
    updated in place (_plan_stage); staging takes what the candidates cannot. record (int64, at least P):
    where the flattened ids are written too, in the same launch."""
    flat = ids.reshape(-1).contiguous()
    n, row_bytes = flat.numel(), staging.shape[1]
    if row_bytes % 4 or staging.shape[0] < n or pool.shape[1] != row_bytes:
        raise ValueError(
            f"staging {tuple(staging.shape)} does not hold {n} experts of whole words as the pool's "
            f"{tuple(pool.shape)}"
        )
    pairs = max(16, triton.next_power_of_2(n))
    out = torch.empty(3, pairs, dtype=torch.int64, device=ids.device)  # [read, copy from, copy to]
    host, candidates, owner = admit if admit is not None else (table, table, table)
    lo = pool.data_ptr()
    _plan_stage[(1,)](
        table, host, flat, n, candidates, owner, lo, lo + pool.numel(), row_bytes, staging.data_ptr(), out,
        record if record is not None else out, PAIRS=pairs,
        CANDS=candidates.numel() if admit is not None else 16, ADMIT=admit is not None, RECORD=record is not None,
    )  # fmt: skip
    _copy_rows[(n, triton.cdiv(row_bytes // 4, STAGE_BLOCK))](
        out[1], out[2], WORDS=row_bytes // 4, BLOCK=STAGE_BLOCK
    )
    return out[0, :n]


def _divisor(n: int) -> int:
    return next(b for b in (128, 64, 32, 16, 8) if n % b == 0)


BLOCK_N = 64


@dataclass(frozen=True)
class GemvConfig:
    """A grouped GEMV's launch: outputs and inputs per program step, programs along K (their partial
    outputs summed in torch, so results do not depend on scheduling), warps per program."""

    block_n: int
    block_k: int
    split: int
    warps: int


# Measured launches, by (GPU name, kernel, K, N, M, pairs): shipped for the GPUs we measured, and this
# machine's own from `python -m tiermoe.bench.kernels --sweep --save` (they win). Others take the rule.
SHIPPED_TUNED = Path(__file__).with_name("gemv_tuned.json")
PROGRAMS_PER_SM = 4  # enough programs in flight to cover a GEMV's load latency


def user_tuned_path() -> Path:
    return user_cache_dir() / "gemv_tuned.json"


def _key(entry: dict) -> tuple:
    return (entry["gpu"], entry["kernel"], entry["k"], entry["n"], entry["m"], entry["pairs"])


def _read_tuned(path: Path) -> list[dict]:
    """A tuned-launch file's entries; one that cannot be read is left out with a warning (the launch rule
    still runs every kernel), never an error."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["entries"]
        for e in entries:
            GemvConfig(**e["config"]), _key(e)
        return entries
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: ignored, not a tuned-launch file ({e!r})", stacklevel=2)
        return []


@functools.cache
def tuned() -> dict[tuple, GemvConfig]:
    return {
        _key(e): GemvConfig(**e["config"]) for p in (SHIPPED_TUNED, user_tuned_path()) for e in _read_tuned(p)
    }


def save_tuned(entries: list[dict], path: Path | None = None) -> Path:
    """Merge `entries` ({gpu, kernel, k, n, m, pairs, config}) into a tuned-launch file (default: this
    machine's), replacing entries of the same key."""
    path = path or user_tuned_path()
    merged = {_key(e): e for e in (*_read_tuned(path), *entries)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": sorted(merged.values(), key=_key)}, indent=1) + "\n")
    tuned.cache_clear()
    return path


@functools.cache
def _gpu() -> tuple[str, int]:
    """This GPU's name and SM count ("cpu" and 1 without one), asked once: launches are chosen per layer
    and token on the copy path."""
    if not torch.cuda.is_available():
        return "cpu", 1
    return torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count


def gemv_config(kernel: str, k: int, n: int, m: int, pairs: int, quantum: int) -> GemvConfig:
    """The launch of one grouped GEMV: a tuned one for this GPU and shape, else BLOCK_N outputs and the
    largest block of inputs that divides `quantum` (the format's group or scale block) per step, with K
    split until the grid holds PROGRAMS_PER_SM programs per SM (a batch-1 decode step alone has 8 pairs:
    too few programs to keep HBM busy)."""
    name, sms = _gpu()
    found = tuned().get((name, kernel, k, n, m, pairs))
    if found is not None:
        return found
    block_k = _divisor(quantum)
    split = 1
    while (
        pairs * triton.cdiv(n, BLOCK_N) * m * split < PROGRAMS_PER_SM * sms and k % (2 * split * block_k) == 0
    ):
        split *= 2
    return GemvConfig(BLOCK_N, block_k, split, 4)


# The fp4 kernels' constants per format: values per block scale, e8m0 (power-of-two) block scales or
# e4m3 ones, and a per-matrix scale.
_FP4 = {
    "mxfp4": {"GS": MXFP4_GROUP, "E8M0": True, "GLOBAL": False},
    "nvfp4": {"GS": NVFP4_GROUP, "E8M0": False, "GLOBAL": True},
}


def gemv_quantum(fmt, prefix: str, k: int) -> tuple[int, int]:
    """(quantum, floor) of a format's GEMV over `prefix`: its block of inputs per step divides quantum
    (a scale group it may not straddle) and is a multiple of floor (the inputs a packed unit or a scale
    holds)."""
    if fmt.kernels == "int4":
        return fmt.groups[prefix], 8
    if fmt.kernels == "fp8":
        return fmt.block[1], 1
    if fmt.kernels == "dense":
        return k, 1
    return k, _FP4[fmt.kernels]["GS"]


def _launch(fmt, prefix: str, k: int, n: int, m: int, pairs: int, config) -> tuple[GemvConfig, int, int]:
    quantum, floor = gemv_quantum(fmt, prefix, k)
    return config or gemv_config(fmt.kernels, k, n, m, pairs, quantum), quantum, floor


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@functools.cache
def fp8_native() -> bool:
    """Whether this GPU converts e4m3 in hardware (sm_89 and later; the interpreter too). Older GPUs (the
    RTX 30 series, A100) decode it from its bits in the kernels."""
    return not torch.cuda.is_available() or INTERPRETED or torch.cuda.get_device_capability() >= (8, 9)


GEMV_KERNELS = {
    "dense": _dense_gemv,
    "int4": _int4_gemv,
    "fp8": _fp8_gemv,
    "nvfp4": _fp4_gemv,
    "mxfp4": _fp4_gemv,
}


def gemv_parts(fmt, prefix: str) -> dict:
    """The GEMV kernel's constants for the `prefix` projection of an expert in `fmt`: where its tensors
    lie in the expert's bytes (offsets), their types, and the format's block sizes."""

    def at(part: str) -> int:
        return fmt.part(part).offset

    if fmt.kernels == "dense":
        return {"W": at(prefix), "W_DT": _TL_DTYPES[fmt.dtype]}
    if fmt.kernels == "int4":
        scales = f"{prefix}_scales"
        return {
            "QW": at(f"{prefix}_qweight"), "QZ": at(f"{prefix}_qzeros"), "SC": at(scales),
            "SC_DT": _TL_DTYPES[fmt.part(scales).dtype], "G": fmt.groups[prefix],
        }  # fmt: skip
    native = fp8_native()
    if fmt.kernels == "fp8":
        return {
            "W": at(prefix),
            "S": at(f"{prefix}_scale"),
            "BO": fmt.block[0],
            "BI": fmt.block[1],
            "FP8_NATIVE": native,
        }
    if fmt.kernels == "mxfp4":
        return {"W": at(prefix), "S": at(f"{prefix}_scales"), "G": 0, **_FP4["mxfp4"], "FP8_NATIVE": native}
    return {
        "W": at(prefix), "S": at(f"{prefix}_scale"), "G": at(f"{prefix}_scale_2"), **_FP4["nvfp4"],
        "FP8_NATIVE": native,
    }  # fmt: skip


def kind_constants(fmt, prefix: str) -> dict:
    """The GEMV kernel's constants of the experts' kind: the `prefix` projection's bias (its byte offset in
    the expert and its type; None: none) and the GLU's clamp (LIMIT None: SwiGLU, the kernels as compiled
    before kinds). Both are constexprs, so each kind compiles its own kernels with nothing to test at run
    time."""
    kind = fmt.kind
    bias = fmt.part(f"{prefix}_bias") if kind.bias else None
    return {
        "BIAS": None if bias is None else bias.offset,
        "BIAS_DT": _TL_DTYPES[fmt.dtype if bias is None else bias.dtype],
        "LIMIT": kind.limit,
        "ALPHA": kind.alpha,
    }


def project(fmt, x, ids, table, prefix, k, n, m, config=None, top_k=1, act_split=0, routing=None):
    """One grouped GEMV over the `prefix` projection (K inputs, N outputs, m stacked matrices) of pair p's
    expert, the one at address table[ids[p]]: float32 [P, m, split, N], the K splits' partial sums
    (added by whoever reads them; the first holds the projection's bias, where the kind has one). Fusions:
    top_k pairs a token (x [T, K]); act_split > 0: x is a gate_up output, read through the kind's GLU;
    routing [P]: each pair's output (bias included) scaled by its weight. A launch's block of inputs must
    divide the format's quantum (a scale group a step may not straddle) and be a multiple of its floor
    (the inputs of a packed unit): ValueError otherwise."""
    config, quantum, floor = _launch(fmt, prefix, k, n, m, ids.numel(), config)
    if quantum % config.block_k or config.block_k % floor:
        raise ValueError(f"{config}: block_k must divide {quantum} and be a multiple of {floor}")
    if config.split > 1 and k % (config.split * config.block_k):  # unsplit, the kernels mask a partial block
        raise ValueError(f"{config} does not divide K = {k}")
    out = torch.empty(ids.numel(), m, config.split, n, dtype=torch.float32, device=x.device)
    GEMV_KERNELS[fmt.kernels][(ids.numel(), triton.cdiv(n, config.block_n), m * config.split)](
        x, ids, table, x if routing is None else routing, out, K=k, N=n, M=m, SPLIT=config.split,
        TOPK=top_k, ACT_SPLIT=act_split, WEIGHTED=routing is not None, BLOCK_K=config.block_k,
        BLOCK_N=config.block_n, num_warps=config.warps, **gemv_parts(fmt, prefix),
        **kind_constants(fmt, prefix),
    )  # fmt: skip
    return out


_SLOT_TABLES: dict[tuple, torch.Tensor] = {}


def slot_table(fmt, bank: dict) -> torch.Tensor:
    """int64 [S]: the address of each slot of a bank of experts (the views of one uint8 [S, nbytes]
    tensor), made once per bank (on the first, eager call: never inside a graph capture)."""
    first = bank[fmt.parts[0].name]
    if first.shape[0] > 1 and first.stride(0) * first.element_size() != fmt.nbytes:  # one slot: any stride
        raise ValueError(
            f"the bank's slots are {first.stride(0) * first.element_size()} bytes apart, not {fmt.nbytes}"
        )
    key = (first.data_ptr(), first.shape[0], fmt.nbytes, str(first.device))
    if key not in _SLOT_TABLES:
        slots = torch.arange(first.shape[0], device=first.device, dtype=torch.int64)
        _SLOT_TABLES[key] = first.data_ptr() + slots * fmt.nbytes
    return _SLOT_TABLES[key]


def _fp4_parts(fmt, bank, prefix: str) -> tuple[tuple, dict]:
    """The fp4 kernels' bank tensors (values, block scales, per-matrix scales) and constants. MXFP4 has no
    per-matrix scale: its scales' tensor stands in for the pointer, unread (GLOBAL off)."""
    if fmt.kernels == "mxfp4":
        scales = bank[f"{prefix}_scales"]
        return (bank[prefix], scales, scales), _FP4["mxfp4"]
    return (
        (bank[prefix], bank[f"{prefix}_scale"].view(torch.uint8), bank[f"{prefix}_scale_2"]),
        _FP4["nvfp4"],
    )


def mlp_at(fmt, x, ids, weights, table) -> torch.Tensor:
    """sum_k weights[t, k] * expert(x[t]) for the experts at addresses table[ids[t, k]] (GPU slots, or
    pinned host memory read in place), in three launches and no host synchronisation: gate and up of
    every pair (and their biases); down of every pair, reading the GLU of gate and up and adding its bias,
    then scaling by its routing weight as it goes; the sum over each token's pairs (and the K splits)."""
    t, k = ids.shape
    h, i = fmt.hidden, fmt.inter
    flat = ids.reshape(-1).contiguous()
    gate_up = project(fmt, x.contiguous(), flat, table, "gate_up", h, i, 2, top_k=k)  # [P, 2, split, I]
    down = project(
        fmt, gate_up, flat, table, "down", i, h, 1, act_split=gate_up.shape[2], routing=weights.reshape(-1)
    )  # [P, 1, split, H]
    return sum_rows(down.view(t, -1, h), x.dtype)


@triton.jit
def _sum_rows(x_ptr, out_ptr, rows, n, BLOCK: tl.constexpr):
    """Program (t, b): columns [b * BLOCK, (b + 1) * BLOCK) of x[t] summed over its rows in order."""
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    live = cols < n
    acc = tl.zeros([BLOCK], tl.float32)
    for r in range(rows):
        acc += tl.load(x_ptr + (t * rows + r) * n + cols, mask=live, other=0.0)
    tl.store(out_ptr + t * n + cols, acc.to(out_ptr.dtype.element_ty), mask=live)


def sum_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, R, N] float32 (contiguous) summed over R, in order, as dtype [T, N]: one launch where torch's
    sum and cast take two."""
    t, r, n = x.shape
    out = torch.empty(t, n, dtype=dtype, device=x.device)
    if out.numel():
        _sum_rows[(t, triton.cdiv(n, SUM_BLOCK))](x, out, r, n, BLOCK=SUM_BLOCK)
    return out


SUM_BLOCK = 512


def bank_mlp(fmt, x, slots, weights, bank) -> torch.Tensor:
    """The format's decode mlp over a bank of expert slots (its views): mlp_at over the slots' addresses."""
    return mlp_at(fmt, x, slots, weights, slot_table(fmt, bank))


BLOCK_M = 16  # tokens of one expert per GEMM program (tl.dot's smallest)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _find_blocks(
    s_ptr, slot_ptr, start_ptr, end_ptr, P, B, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    """_blocks in one program: over the P sorted slots (negative ones first, in no block), a block starts
    at each slot's first pair and every BLOCK_M pairs after it; its end is BLOCK_M on or the slot's last
    pair. Blocks [count, B) are written empty (slot 0, start = end = 0)."""
    i = tl.arange(0, BLOCK)
    inside = i < P
    s = tl.load(s_ptr + i, mask=inside, other=-1)
    prev = tl.load(s_ptr + i - 1, mask=inside & (i > 0), other=-1)
    after = tl.load(s_ptr + i + 1, mask=i + 1 < P, other=-1)
    live = s >= 0
    first = tl.associative_scan(tl.where(live & (s != prev), i, 0), 0, _max)  # the slot's first pair
    # and its last: a min scan from the right, as a forward scan over the flipped order (compiled Triton's
    # reverse=True scans have had wrong results reported; tl.flip needs 2 or more, so BLOCK >= 2)
    last = tl.flip(tl.associative_scan(tl.flip(tl.where(live & (s != after), i, P), 0), 0, _min), 0)
    starts = live & ((i - first) % BLOCK_M == 0)
    b = tl.cumsum(starts.to(tl.int32), 0) - 1
    tl.store(slot_ptr + b, s.to(tl.int32), mask=starts)
    tl.store(start_ptr + b, i, mask=starts)
    tl.store(end_ptr + b, tl.minimum(i + BLOCK_M, last + 1), mask=starts)
    rest = tl.arange(0, BLOCK_B)
    empty = (rest >= tl.sum(starts.to(tl.int32), 0)) & (rest < B)
    zero = tl.zeros((BLOCK_B,), dtype=tl.int32)
    tl.store(slot_ptr + rest, zero, mask=empty)
    tl.store(start_ptr + rest, zero, mask=empty)
    tl.store(end_ptr + rest, zero, mask=empty)


FIND_BLOCKS_MAX_PAIRS = 4096  # one program holds every pair: a decode step's, not a long prefill's


def _blocks(slots_sorted: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot, start, end) of each block of at most BLOCK_M consecutive sorted pairs of one slot, int32, on
    the pairs' device with no host synchronisation (so a decode step of many pairs is graph-safe): as many
    blocks as any routing of these pairs can need, those past the last one empty (start == end, where
    the GEMM reads nothing). slots_sorted: the pairs' slots in ascending order, in [0, num_slots), after
    any negative ones (pairs served elsewhere), which no block holds.
    Shapes: counts, first pair and blocks per slot [S]; blocks [B]. Up to FIND_BLOCKS_MAX_PAIRS pairs in
    one launch (a decode step), by tensor ops above (about 20 launches)."""
    pairs, device = slots_sorted.numel(), slots_sorted.device
    count = triton.cdiv(pairs, BLOCK_M) + min(pairs, num_slots)
    if pairs <= FIND_BLOCKS_MAX_PAIRS:
        blocks = torch.empty(3, count, dtype=torch.int32, device=device)
        _find_blocks[(1,)](
            slots_sorted.contiguous(), blocks[0], blocks[1], blocks[2], pairs, count,
            BLOCK=max(2, triton.next_power_of_2(pairs)), BLOCK_B=triton.next_power_of_2(count), BLOCK_M=BLOCK_M,
        )  # fmt: skip
        return blocks[0], blocks[1], blocks[2]
    live = slots_sorted >= 0
    counts = torch.zeros(num_slots, dtype=torch.int64, device=device)
    counts.scatter_add_(0, slots_sorted.clamp(min=0).long(), live.long())
    first = (pairs - live.sum()) + counts.cumsum(0) - counts  # each slot's first sorted pair
    per_slot = (counts + BLOCK_M - 1) // BLOCK_M
    ends = per_slot.cumsum(0)  # one past each slot's last block
    # Each slot's blocks are ceil(count / BLOCK_M) <= count / BLOCK_M + 1, and at most min(pairs, S) slots
    # hold pairs.
    b = torch.arange(count, device=device)
    slot = torch.searchsorted(ends, b, right=True)
    real = slot < num_slots
    slot = slot.clamp(max=num_slots - 1)
    start = first[slot] + (b - (ends[slot] - per_slot[slot])) * BLOCK_M
    end = torch.minimum(start + BLOCK_M, first[slot] + counts[slot])
    zero = torch.zeros_like(start)
    return slot.int(), torch.where(real, start, zero).int(), torch.where(real, end, zero).int()


def _fused(fmt, out: torch.Tensor, glu: bool, scatter: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """A GEMM launch's fusions: glu (its input the kind's GLU of a gate_up GEMM's output), scatter (dst,
    routing weights: each row stored at its pair's own row, times its weight; out stands in for the
    pointers where unused)."""
    dst, rw = scatter if scatter is not None else (out, out)
    kind = fmt.kind
    return {
        "dst_ptr": dst,
        "rw_ptr": rw,
        "GLU": glu,
        "LIMIT": kind.limit,
        "ALPHA": kind.alpha,
        "SCATTER": scatter is not None,
    }


def _gemm_out(x: torch.Tensor, rows: int, m: int, n: int, scatter) -> torch.Tensor:
    """A GEMM's float32 output [rows, m, n]: zeros where it scatters (the rows of skipped pairs stay 0)."""
    return (torch.zeros if scatter is not None else torch.empty)(
        rows, m, n, dtype=torch.float32, device=x.device
    )


def _gemm_bias(fmt, bank, prefix: str, out: torch.Tensor) -> tuple[tuple, bool]:
    """The GEMM's bias operands: the `prefix` projection's biases [S, N] and their slot stride, and
    whether there are any; without, out stands in for the pointer, unread (BIAS off)."""
    if not fmt.kind.bias:
        return (out, 0), False
    bias = bank[f"{prefix}_bias"]
    return (bias, bias.stride(0)), True


def _dense_gemm_project(
    fmt, x, tok, blocks, bank, prefix: str, k: int, n: int, m: int, glu: bool = False, scatter=None
) -> torch.Tensor:
    w = bank[prefix]
    out = _gemm_out(x, tok.numel(), m, n, scatter)
    (b, b_stride), bias = _gemm_bias(fmt, bank, prefix, out)
    _dense_gemm[(blocks[0].numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), tok, *blocks, w, out, b, w.stride(0), b_stride, K=k, N=n, M=m, BLOCK_M=BLOCK_M,
        BLOCK_K=min(64, triton.next_power_of_2(k)), BLOCK_N=BLOCK_N,
        EXACT=INTERPRETED or w.dtype == torch.float32, BIAS=bias,
        **_fused(fmt, out, glu, scatter),
    )  # fmt: skip
    return out


def _int4_gemm_project(
    fmt, x, tok, blocks, bank, prefix: str, k: int, n: int, m: int, glu: bool = False, scatter=None
) -> torch.Tensor:
    qw, qz, sc = (bank[f"{prefix}_{part}"] for part in ("qweight", "qzeros", "scales"))
    group = fmt.groups[prefix]
    out = _gemm_out(x, tok.numel(), m, n, scatter)
    (b, b_stride), bias = _gemm_bias(fmt, bank, prefix, out)
    _int4_gemm[(blocks[0].numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), tok, *blocks, qw, qz, sc, out, b, qw.stride(0), qz.stride(0), sc.stride(0), b_stride,
        K=k, N=n, G=group, M=m, BLOCK_M=BLOCK_M, BLOCK_K=max(16, _divisor(group)), BLOCK_N=BLOCK_N,
        DOT_FP32=INTERPRETED, BIAS=bias,
        **_fused(fmt, out, glu, scatter),
    )  # fmt: skip
    return out


def _fp8_gemm_project(
    fmt, x, tok, blocks, bank, prefix: str, k: int, n: int, m: int, glu: bool = False, scatter=None
) -> torch.Tensor:
    w, s = bank[prefix].view(torch.uint8), bank[f"{prefix}_scale"]
    out = _gemm_out(x, tok.numel(), m, n, scatter)
    (b, b_stride), bias = _gemm_bias(fmt, bank, prefix, out)
    bo, bi = fmt.block
    _fp8_gemm[(blocks[0].numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), tok, *blocks, w, s, out, b, w.stride(0), s.stride(0), b_stride,
        K=k, N=n, BO=bo, BI=bi, M=m, BLOCK_M=BLOCK_M, BLOCK_K=max(16, min(_divisor(bi), 128)), BLOCK_N=BLOCK_N,
        DOT_FP32=INTERPRETED, FP8_NATIVE=fp8_native(), BIAS=bias,
        **_fused(fmt, out, glu, scatter),
    )  # fmt: skip
    return out


def _fp4_gemm_project(
    fmt, x, tok, blocks, bank, prefix: str, k: int, n: int, m: int, glu: bool = False, scatter=None
) -> torch.Tensor:
    weights, sizes = _fp4_parts(fmt, bank, prefix)
    out = _gemm_out(x, tok.numel(), m, n, scatter)
    (b, b_stride), bias = _gemm_bias(fmt, bank, prefix, out)
    _fp4_gemm[(blocks[0].numel(), triton.cdiv(n, BLOCK_N), m)](
        x.contiguous(), tok, *blocks, *weights, out, b, *(w.stride(0) for w in weights), b_stride, K=k, N=n,
        M=m, BLOCK_M=BLOCK_M, BLOCK_K=max(32, _divisor(k)), BLOCK_N=BLOCK_N, DOT_FP32=INTERPRETED,
        FP8_NATIVE=fp8_native(), BIAS=bias, **sizes,
        **_fused(fmt, out, glu, scatter),
    )  # fmt: skip
    return out


_PROJECT = {  # each format's grouped GEMM launch, by its `kernels` name
    "dense": _dense_gemm_project,
    "int4": _int4_gemm_project,
    "fp8": _fp8_gemm_project,
    "nvfp4": _fp4_gemm_project,
    "mxfp4": _fp4_gemm_project,
}


def _grouped(fmt, x, tokens, slots, weights, bank) -> torch.Tensor:
    """weights[i] * expert_{slots[i]}(x[tokens[i]]) of every pair, float32 [P, H] in the pairs' own order,
    by two grouped GEMMs over the pairs sorted by expert: gate and up plus their biases (added as the GEMM
    stores them), then down reading the kind's GLU of those as its input, adding its bias and storing each
    pair's row in its own place times its routing weight. A pair whose slot is negative (served elsewhere:
    another wave, the CPU) is in no block and gives 0. No host synchronisation."""
    project = _PROJECT[fmt.kernels]
    order = torch.argsort(slots)
    tok, s_sorted = tokens[order].contiguous(), slots[order]
    blocks = _blocks(s_sorted, bank[fmt.parts[0].name].shape[0])
    gate_up = project(fmt, x, tok, blocks, bank, "gate_up", fmt.hidden, fmt.inter, 2)  # [P, 2, I], sorted
    rows = torch.arange(tok.numel(), device=x.device)
    scatter = (order, weights.float().contiguous())
    return project(fmt, gate_up, rows, blocks, bank, "down", fmt.inter, fmt.hidden, 1, True, scatter)[:, 0]


def grouped_accumulate(fmt, x, tokens, slots, weights, bank, out) -> torch.Tensor:
    """out[tokens[i]] += weights[i] * expert_{slots[i]}(x[tokens[i]]) (prefill, the copy path's waves):
    _grouped, then one scatter-add."""
    return out.index_add_(0, tokens, _grouped(fmt, x, tokens, slots, weights, bank).to(out.dtype))


def grouped_pairs(fmt, x, slots, weights, bank) -> torch.Tensor:
    """Each pair's weighted output by _grouped, float32 [T, k, H] (x [T, H], slots and weights [T, k]; pair
    p is token p // k's); 0 where the slot is negative."""
    t, k = slots.shape
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)
    return _grouped(fmt, x, tokens, slots.reshape(-1), weights.reshape(-1), bank).view(t, k, -1)


def grouped_mlp(fmt, x, slots, weights, bank) -> torch.Tensor:
    """The format's mlp over many pairs (a batched decode step) by grouped_pairs, each token's k outputs
    summed in float32: no atomic adds, so a replay gives the same bits (a scatter-add's order is not
    fixed)."""
    return grouped_pairs(fmt, x, slots, weights, bank).sum(dim=1).to(x.dtype)
