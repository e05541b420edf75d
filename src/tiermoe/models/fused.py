"""Triton kernels for the decoder's small ops on CUDA: RMSNorm (with the residual add before it, where it
follows a sublayer), the rotary embedding and the softmax router, one launch each where torch's eager ops
make eight (nine), five and six; and for a decode step (one token a row) the per-head norms, rotations
and K/V cache writes in one launch and attention read through the block tables in one or two, where
gathering the cache and SDPA took about twenty-three. At batch 1 a decode step is thousands of such
launches, and a CUDA graph replays each in a few microseconds whatever its size, so their number sets
much of the step's time (Qwen3-30B-A3B: about 50 launches a layer before the decode kernels, 48 layers).

Each elementwise kernel rounds where torch's ops do (to the tensor's dtype after each product, and no
fused multiply-adds: `enable_fp_fusion=False`), so the rotary gives torch's values exactly and RMSNorm
gives them up to the order of its sum of squares; decode attention computes its softmax in float32 and
weighs the values with the probabilities rounded to their dtype, as flash attention does. Imported only where
used (CUDA, or the tests with TRITON_INTERPRET=1 set before the import), since triton decides at
decoration whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _round(v, dt: tl.constexpr):
    """float32 v rounded to dt and back, to nearest even: for bf16 by its bits, since Triton's interpreter
    (the CPU tests) truncates where a compiled cast rounds; then storing it as dt is exact either way."""
    if dt == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # a NaN's bits would carry into -0.0
    else:
        v = v.to(dt).to(tl.float32)
    return v


@triton.jit
def _rms_norm(
    x_ptr, w_ptr, out_ptr, n, inner, x_outer, x_inner, eps, delta_ptr, sum_ptr,
    BLOCK: tl.constexpr, FLOAT32_SCALE: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements in long prompts
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row // inner * x_outer + row % inner * x_inner + cols, mask=mask, other=0.0).to(
        tl.float32
    )
    if ADD:  # the residual stream: x + delta in x's dtype, stored, then normalised (contiguous rows)
        x = _round(
            x + tl.load(delta_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32),
            x_ptr.dtype.element_ty,
        )
        tl.store(sum_ptr + row * n + cols, x.to(sum_ptr.dtype.element_ty), mask=mask)
    normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if not FLOAT32_SCALE:  # torch: weight * normed.to(dtype), the product in the promoted dtype
        normed = _round(normed, x_ptr.dtype.element_ty)
    out = _round(w * normed, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, float32_scale: bool = False) -> torch.Tensor:
    """x [..., n] -> RMSNorm(x) * weight [n]. float32_scale: the weight multiplies in float32 before the
    cast to x's dtype (gpt-oss); else the normalised x is cast first and the product takes the promoted
    dtype of weight and x, as `weight * normed.to(x.dtype)` does."""
    n = x.shape[-1]
    # [outer, inner, n] rows two strides apart: per-head rows of a q or k that is a view into a fused
    # q/k/v projection ([B, T, heads, D], heads D apart, tokens the projection's width apart) stay views.
    rows = x.reshape(-1, x.shape[-2] if x.dim() > 2 else 1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _normed(rows, x.shape, weight, eps, float32_scale)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, float32_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) in one launch: the residual stream after a sublayer and
    the next sublayer's input. x and delta [..., n] contiguous, of one dtype (else None: the torch ops)."""
    if not (
        x.is_contiguous() and delta.is_contiguous() and x.dtype == delta.dtype and x.shape == delta.shape
    ):
        return None
    total = torch.empty_like(x)
    rows = x.view(-1, 1, x.shape[-1])
    return total, _normed(rows, x.shape, weight, eps, float32_scale, delta, total)


def _normed(rows, shape, weight, eps, float32_scale, delta=None, total=None) -> torch.Tensor:
    """The norm of rows [outer, inner, n] (last stride 1), shaped `shape`; with delta, of rows + delta,
    their sum written to total (both contiguous like rows)."""
    n = rows.shape[-1]
    dtype = rows.dtype if float32_scale else torch.promote_types(weight.dtype, rows.dtype)
    out = torch.empty(shape, dtype=dtype, device=rows.device)
    if out.numel():
        add = delta is not None
        _rms_norm[(rows.shape[0] * rows.shape[1],)](
            rows, weight, out, n, rows.shape[1], rows.stride(0), rows.stride(1), eps,
            delta if add else out, total if add else out,
            BLOCK=triton.next_power_of_2(n), FLOAT32_SCALE=float32_scale, ADD=add, enable_fp_fusion=False,
        )  # fmt: skip
    return out


@triton.jit
def _rotate(
    x_ptr, cos_ptr, sin_ptr, out_ptr, heads, length,
    sxb, sxh, sxt, scb, sch, sct, sob, soh, sot,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (batch, head, position) row; offsets past 2**31 elements
    t = row % length
    h = (row // length) % heads
    b = row // (length * heads)
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    x = x_ptr + b * sxb + h * sxh + t * sxt
    at = b * scb + h * sch + t * sct
    x1 = tl.load(x + cols, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF + cols, mask=mask).to(tl.float32)
    cos1 = tl.load(cos_ptr + at + cols, mask=mask).to(tl.float32)
    cos2 = tl.load(cos_ptr + at + HALF + cols, mask=mask).to(tl.float32)
    sin1 = tl.load(sin_ptr + at + cols, mask=mask).to(tl.float32)
    sin2 = tl.load(sin_ptr + at + HALF + cols, mask=mask).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype before the sum, as torch's ops round
    lo = _round(_round(x1 * cos1, dt) + _round(-x2 * sin1, dt), dt)
    hi = _round(_round(x2 * cos2, dt) + _round(x1 * sin2, dt), dt)
    out = out_ptr + b * sob + h * soh + t * sot
    tl.store(out + cols, lo.to(dt), mask=mask)
    tl.store(out + HALF + cols, hi.to(dt), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The rotate-half rotary embedding of x [B, H, T, D] (any strides, the last 1) by cos and sin
    broadcast to it (e.g. [B, 1, T, D]); None where these shapes or dtypes are not the kernel's."""
    if x.dim() != 4 or x.stride(-1) != 1 or x.shape[-1] % 2 or not (x.dtype == cos.dtype == sin.dtype):
        return None
    try:
        cos, sin = cos.expand(x.shape), sin.expand(x.shape)
    except RuntimeError:
        return None
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        return None
    b, h, t, d = x.shape
    # [B, T, H, D] in memory: the layout attention's K and V writes take as a view (tokens, heads, D).
    out = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    if out.numel():
        _rotate[(b * h * t,)](
            x, cos, sin, out, h, t, *x.stride()[:3], *cos.stride()[:3], *out.stride()[:3],
            HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), enable_fp_fusion=False,
        )  # fmt: skip
    return out


@triton.jit
def _router_row(logits_ptr, stride, experts, BLOCK: tl.constexpr):
    """This program's token (row), the expert ids it spans (cols), and the float32 softmax of its router
    logits (probs, 0 past the experts)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    logits = tl.load(logits_ptr + row * stride + cols, mask=cols < experts, other=float("-inf")).to(
        tl.float32
    )
    e = tl.exp(logits - tl.max(logits, axis=0))
    return row, cols, e / tl.sum(e, axis=0)


@triton.jit
def _softmax_topk(logits_ptr, weights_ptr, ids_ptr, experts, stride, K: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    row, cols, probs = _router_row(logits_ptr, stride, experts, BLOCK)
    # The k largest, twice: first for their sum (the normalisation), then to store them, largest first.
    total = 0.0
    left = probs
    for _ in tl.static_range(K):
        best = tl.max(left, axis=0)
        total += best
        left = tl.where(cols == tl.min(tl.where(left == best, cols, BLOCK), axis=0), -1.0, left)
    if not NORM:
        total = 1.0
    left = probs
    for i in tl.static_range(K):
        best = tl.max(left, axis=0)
        # The lowest id among equal ones; a NaN row (no probability equals its max) stays in range.
        at = tl.minimum(tl.min(tl.where(left == best, cols, BLOCK), axis=0), experts - 1)
        tl.store(ids_ptr + row * K + i, at.to(tl.int64))
        w = _round(best / total, weights_ptr.dtype.element_ty)
        tl.store(weights_ptr + row * K + i, w.to(weights_ptr.dtype.element_ty))
        left = tl.where(cols == at, -1.0, left)


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype):
    """A softmax router's choice from its logits [T, E]: (weights [T, k] in dtype, ids [T, k] int64), as
    `topk(softmax(logits, float32), k)` (the k largest, largest first; among equal ones the lower id)
    then, with normalize, the weights divided by their sum, all in float32 until the cast."""
    t, e = logits.shape
    weights = torch.empty(t, k, dtype=dtype, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    if t:
        _softmax_topk[(t,)](
            logits,
            weights,
            ids,
            e,
            logits.stride(0),
            K=k,
            BLOCK=triton.next_power_of_2(e),
            NORM=normalize,
            enable_fp_fusion=False,
        )
    return weights, ids


@triton.jit
def _softmax_pick(logits_ptr, ids_ptr, weights_ptr, experts, stride, K: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    row, cols, probs = _router_row(logits_ptr, stride, experts, BLOCK)
    total = 0.0
    if NORM:
        for i in tl.static_range(K):
            total += tl.sum(tl.where(cols == tl.load(ids_ptr + row * K + i), probs, 0.0), axis=0)
    else:
        total = 1.0
    for i in tl.static_range(K):
        w = tl.sum(tl.where(cols == tl.load(ids_ptr + row * K + i), probs, 0.0), axis=0)
        w = _round(w / total, weights_ptr.dtype.element_ty)
        tl.store(weights_ptr + row * K + i, w.to(weights_ptr.dtype.element_ty))


def softmax_pick(
    logits: torch.Tensor, ids: torch.Tensor, normalize: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The router's weights [T, k] in dtype of experts chosen elsewhere (ids [T, k]): their probabilities
    under softmax(logits [T, E], float32), with normalize divided by their sum, as
    `softmax(logits).gather(-1, ids)` then the normalisation does."""
    t, e = logits.shape
    ids = ids.contiguous()
    weights = torch.empty(ids.shape, dtype=dtype, device=logits.device)
    if t:
        _softmax_pick[(t,)](
            logits, ids, weights, e, logits.stride(0), K=ids.shape[1], BLOCK=triton.next_power_of_2(e),
            NORM=normalize, enable_fp_fusion=False,
        )  # fmt: skip
    return weights


@triton.jit
def _rope_cache(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slots_ptr, qout_ptr, kpool_ptr, vpool_ptr,
    heads, eps, sq, sk, sv, sc, ss, sks, skh, svs, svh,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr, FLOAT32_SCALE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    half = cols < HALF
    if head < heads:
        x, w, out = q_ptr + b * sq + head * D, qw_ptr, qout_ptr + (b * heads + head) * D
    else:  # a key head: its key rotated and its value, written at the token's slot
        kv = head - heads
        slot = tl.load(slots_ptr + b * ss)
        x, w, out = k_ptr + b * sk + kv * D, kw_ptr, kpool_ptr + slot * sks + kv * skh
        value, to = v_ptr + b * sv + kv * D, vpool_ptr + slot * svs + kv * svh
        tl.store(to + cols, tl.load(value + cols, mask=half), mask=half)
        tl.store(to + HALF + cols, tl.load(value + HALF + cols, mask=half), mask=half)
    dt = out.dtype.element_ty
    x1 = tl.load(x + cols, mask=half).to(tl.float32)
    x2 = tl.load(x + HALF + cols, mask=half).to(tl.float32)
    if NORM:  # RMSNorm over the head (_rms_norm's arithmetic: the same sum over the whole row)
        whole = tl.load(x + tl.arange(0, 2 * BLOCK), mask=tl.arange(0, 2 * BLOCK) < D, other=0.0).to(
            tl.float32
        )
        scale = tl.math.rsqrt(tl.sum(whole * whole, axis=0) / D + eps)
        x1, x2 = x1 * scale, x2 * scale
        if not FLOAT32_SCALE:
            x1, x2 = _round(x1, dt), _round(x2, dt)
        x1 = _round(tl.load(w + cols, mask=half).to(tl.float32) * x1, dt)
        x2 = _round(tl.load(w + HALF + cols, mask=half).to(tl.float32) * x2, dt)
    at = cos_ptr + b * sc
    cos1 = tl.load(at + cols, mask=half).to(tl.float32)
    cos2 = tl.load(at + HALF + cols, mask=half).to(tl.float32)
    at = sin_ptr + b * sc
    sin1 = tl.load(at + cols, mask=half).to(tl.float32)
    sin2 = tl.load(at + HALF + cols, mask=half).to(tl.float32)
    lo = _round(_round(x1 * cos1, dt) + _round(-x2 * sin1, dt), dt)  # _rotate's rounding
    hi = _round(_round(x2 * cos2, dt) + _round(x1 * sin2, dt), dt)
    tl.store(out + cols, lo.to(dt), mask=half)
    tl.store(out + HALF + cols, hi.to(dt), mask=half)


def rope_into_cache_fits(q, k, v, cos, sin, pools) -> bool:
    """Whether rope_into_cache takes q [B, T, H x D], k, v [B, T, KV x D], cos and sin [B, T, D] and the
    cache's pools: one token a row, rows of unit stride, one dtype, cos and sin laid out alike."""
    return (
        q.shape[1] == 1
        and cos.shape[-1] % 2 == 0
        and all(x.stride(-1) == 1 for x in (q, k, v, cos, *pools))
        and cos.stride() == sin.stride()
        and all(x.dtype == q.dtype for x in (k, v, cos, sin, *pools))
    )


def rope_into_cache(q, k, v, cos, sin, slots, k_pool, v_pool, norms=None, eps=0.0, float32_scale=False):
    """A decode step's queries and keys, each head RMS-normalised (norms: the per-head q and k weights, or
    None) and rotated, the keys and values written at the tokens' slots (k_pool, v_pool [slots, KV, D]),
    in one launch where the norms, the rotations and the writes take six. q [B, 1, H x D], k, v
    [B, 1, KV x D], cos, sin [B, 1, D], slots [B, 1] (rows any stride apart: the runner's are columns of
    one packed tensor). Returns the rotated queries [B, H, 1, D]; the
    rounding is the RMSNorm and rotary kernels' (the same bits as those two apart)."""
    b = q.shape[0]
    d = cos.shape[-1]
    heads, kv_heads = q.shape[-1] // d, k.shape[-1] // d
    out = torch.empty(b, 1, heads, d, dtype=q.dtype, device=q.device)
    qw, kw = norms if norms is not None else (q, q)
    _rope_cache[(b, heads + kv_heads)](
        q, k, v, cos, sin, qw, kw, slots, out, k_pool, v_pool, heads, eps,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), slots.stride(0),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        D=d, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), NORM=norms is not None,
        FLOAT32_SCALE=float32_scale, enable_fp_fusion=False,
    )  # fmt: skip
    return out.transpose(1, 2)


# Triton's interpreter (the CPU tests): its bf16 tl.dot is wrong, so tiles go to float32 there (the
# formats' kernels read this too).
INTERPRETED = (
    triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
)
KEYS_PER_SPLIT = 512  # keys one program of a long row's attention reads before the rows' partials combine
MAX_SPLITS = 32


@triton.jit
def _decode_attention(
    q_ptr, k_ptr, v_ptr, tables_ptr, positions_ptr, lengths_ptr, sinks_ptr, out_ptr, part_ptr,
    group, window, chunk, width, scale, splits,
    sqb, sqh, sks, skh, svs, svh, stb, spb, spos, slen,
    D: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    WINDOW: tl.constexpr, SINKS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, G)  # the query heads that share this key head, padded to tl.dot's 16
    heads = kv * group + rows
    live = rows < group
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=live[:, None] & dmask[None, :], other=0.0
    )
    qpos = tl.load(positions_ptr + b * spos)
    length = tl.load(lengths_ptr + b * slen)
    # The keys this query sees (KVCache.mask): at or before its position and written by now, inside the
    # window; its own position always. This program reads those in its split's chunk of the row.
    lo = split * chunk
    hi = tl.minimum(tl.minimum(lo + chunk, qpos + 1), width)  # KVCache.mask's keys end at the table's
    if WINDOW:
        lo = tl.maximum(lo, qpos - window + 1)
    m = tl.full([G], float("-inf"), tl.float32)
    total = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, BLOCK_D], tl.float32)
    for start in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        seen = (kpos >= lo) & (kpos < hi) & ((kpos < length) | (kpos == qpos))
        page = tl.load(tables_ptr + b * stb + kpos // PAGE, mask=seen, other=0)
        slot = page * PAGE + kpos % PAGE
        both = seen[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * sks + kv * skh + d[None, :], mask=both, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * svs + kv * svh + d[None, :], mask=both, other=0.0)
        if DOT_FP32:  # Triton's interpreter: its bf16 tl.dot is wrong
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(seen[None, :], s * scale, float("-inf"))  # [G, BLOCK_N]
        grown = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(grown == float("-inf"), 0.0, grown)  # a row with nothing seen yet stays empty
        p = tl.exp(s - base[:, None])
        keep = tl.exp(m - base)
        total = total * keep + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * keep[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v)
        m = grown
    if SPLIT:  # partials [B, H, splits, 2 + D]: max, sum, weighted values; _combine_splits finishes
        at = part_ptr + b * spb + heads * (splits * (2 + D)) + split * (2 + D)
        tl.store(at, m, mask=live)
        tl.store(at + 1, total, mask=live)
        tl.store(at[:, None] + 2 + d[None, :], acc, mask=live[:, None] & dmask[None, :])
    else:
        _finish(
            m,
            total,
            acc,
            sinks_ptr,
            heads,
            live,
            out_ptr + b * (group * tl.num_programs(1) * D),
            d,
            dmask,
            D,
            SINKS,
        )


@triton.jit
def _finish(m, total, acc, sinks_ptr, heads, live, out_ptr, d, dmask, D: tl.constexpr, SINKS: tl.constexpr):
    """Rows [G] of the softmax's max, sum and weighted values -> the output heads; a sink is one more
    logit per head in the sum, with no value (gpt-oss)."""
    if SINKS:
        sink = tl.load(sinks_ptr + heads, mask=live, other=0.0).to(tl.float32)
        grown = tl.maximum(m, sink)
        keep = tl.exp(m - grown)
        total = total * keep + tl.exp(sink - grown)
        acc = acc * keep[:, None]
    out = acc / total[:, None]
    tl.store(
        out_ptr + heads[:, None] * D + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=live[:, None] & dmask[None, :],
    )


@triton.jit
def _combine_splits(
    part_ptr, sinks_ptr, out_ptr, splits, spb,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SINKS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    heads = h + tl.arange(0, 1)  # _finish's rows: this one head
    live = heads >= 0
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    at = part_ptr + b * spb + h * (splits * (2 + D)) + s * (2 + D)  # [BLOCK_S]
    m = tl.load(at, mask=s < splits, other=float("-inf"))
    total = tl.load(at + 1, mask=s < splits, other=0.0)
    acc = tl.load(at[:, None] + 2 + d[None, :], mask=(s < splits)[:, None] & dmask[None, :], other=0.0)
    top = tl.max(m, axis=0)  # the query's own key is in some split, so top is finite
    w = tl.exp(m - top)  # empty splits (-inf) weigh nothing
    _finish(
        top + tl.zeros([1], tl.float32), tl.sum(total * w, axis=0) + tl.zeros([1], tl.float32),
        tl.sum(acc * w[:, None], axis=0)[None, :], sinks_ptr, heads, live,
        out_ptr + b * (tl.num_programs(1) * D), d, dmask, D, SINKS,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    page: int,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token a row attending to its row's keys in the paged cache, in place of gathering them
    and running SDPA (about fifteen launches a layer at batch 1, in one or two). q [B, H, 1, D] (any
    strides, the last 1); k_pool, v_pool [slots, KV, D] with H a multiple of KV (query head h reads key
    head h // (H / KV), as SDPA's enable_gqa pairs them); tables [B, NB] the rows' blocks of `page` slots;
    positions [B, 1] and lengths [B] as KVBatch has them (rows any stride apart). Scale 1/sqrt(D), softmax in float32, keys masked
    as KVCache.mask does. Returns [B, 1, H * D] in q's dtype."""
    b, h, _, d = q.shape
    kv = k_pool.shape[1]
    width = tables.shape[1] * page
    splits = 1 if b * kv >= 128 else min(triton.cdiv(width, KEYS_PER_SPLIT), MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(width, splits), page) * page
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    part = torch.empty(b, h, splits, 2 + d, dtype=torch.float32, device=q.device) if splits > 1 else out
    tables = tables if tables.stride(-1) == 1 else tables.contiguous()
    sinks_ = sinks if sinks is not None else out
    _decode_attention[(b, kv, splits)](
        q, k_pool, v_pool, tables, positions, lengths, sinks_, out, part,
        h // kv, window or 0, chunk, width, d**-0.5, splits,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        tables.stride(0), part.stride(0) if splits > 1 else 0, positions.stride(0), lengths.stride(0),
        D=d, G=max(16, triton.next_power_of_2(h // kv)), BLOCK_N=64 if d <= 128 else 32,
        BLOCK_D=triton.next_power_of_2(d), PAGE=page, WINDOW=bool(window), SINKS=sinks is not None,
        SPLIT=splits > 1, DOT_FP32=INTERPRETED or q.dtype == torch.float32,
    )  # fmt: skip
    if splits > 1:
        _combine_splits[(b, h)](
            part, sinks_, out, splits, part.stride(0),
            D=d, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(d), SINKS=sinks is not None,
        )  # fmt: skip
    return out
