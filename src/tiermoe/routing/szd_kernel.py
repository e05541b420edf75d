"""SZD routing's decode step (one token a row) in one Triton launch on CUDA.

Routed by torch's ops, a step hashes its keys and draws its noise in about 230 small kernels whatever the
depth (each hash is a dozen integer ops on a tensor of keys): at batch 1 that is several percent of a decode
step of Qwen3-30B-A3B that the trained model's router does not spend. The kernel computes the same hashes
bit for bit (rng.py's, in int64) and the same float32 formulas; its log and cos may differ from torch's by
an ulp, so an exact tie between two experts' scores could break the other way (never seen in the tests).
Imported only where used, as models/fused.py is.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import rng


@triton.jit
def _mix(x):
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _chain(h, k):
    """rng.hash_keys's step: one more key into the hash h."""
    return _mix((h * 31 + k + 0x9E3779B9) & 0xFFFFFFFF)


@triton.jit
def _uniform(h):
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _szd_decode(
    seed_hash, docs_ptr, rows_ptr, positions_ptr, valid_ptr, base_ptr, z_ptr, prev_ptr, ids_ptr, h_ptr,
    slots, experts, phi, drift, sigma_loc, p_stick, s_doc, s_row, s_pos, s_valid,
    EPS: tl.constexpr, GUMBEL: tl.constexpr, STICK: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    layer = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(1)
    e = tl.arange(0, BLOCK)
    inside = e < experts
    doc = tl.load(docs_ptr + b * s_doc)
    pos = tl.load(positions_ptr + b * s_pos)
    v = tl.load(valid_ptr + b * s_valid) != 0
    state = layer * slots + tl.load(rows_ptr + b * s_row)
    # hash_keys(seed, layer, doc, position), then each purpose's draws hash (that key, purpose, index)
    key = _mix((_chain(_chain(_chain(seed_hash, layer), doc), pos) + 0x9E3779B9) & 0xFFFFFFFF)
    h_eps = _chain(_chain(key, EPS), e)
    u1 = _uniform(_mix(h_eps ^ 0x5BD1E995))
    u2 = _uniform(_mix(h_eps ^ 0x1B873593))
    eps = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos((2 * math.pi) * u2)
    noise = -tl.log(-tl.log(_uniform(_chain(_chain(key, GUMBEL), e))))
    z = tl.load(z_ptr + state * experts + e, mask=inside, other=0.0)
    z = tl.where(v, phi * z + drift * eps, z)
    h = tl.load(base_ptr + state * experts + e, mask=inside, other=0.0) + sigma_loc * z
    tl.store(z_ptr + state * experts + e, z, mask=inside)
    tl.store(h_ptr + (layer * rows + b) * experts + e, h, mask=inside)
    # Kept experts of the previous token outrank every fresh draw; the rest by Gumbel-top-k.
    score = h + noise
    stick_key = _chain(key, STICK)
    for j in tl.static_range(K):
        prev = tl.load(prev_ptr + state * K + j)
        keep = (prev >= 0) & (_uniform(_chain(stick_key, j)) < p_stick)
        score = tl.where(keep & (e == prev), score + 1e9, score)
    left = tl.where(inside, score, float("-inf"))
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        at = tl.min(tl.where(left == best, e, BLOCK), axis=0).to(tl.int64)
        tl.store(ids_ptr + (layer * rows + b) * K + j, at)
        prev = tl.load(prev_ptr + state * K + j)
        tl.store(prev_ptr + state * K + j, tl.where(v, at, prev))
        left = tl.where(e == at, float("-inf"), left)


def szd_decode(
    model, docs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, purposes
) -> None:
    """SZDRouting.step for positions [B, 1]: model.ids [L, B, 1, k] and model.h [L, B, 1, E] written, its
    state rows advanced in place. purposes: (eps, gumbel, stick), the draws' purpose keys. docs, rows [B],
    positions, valid [B, 1]: rows any stride apart (the runner's are columns of one packed tensor)."""
    p, s = model.p, model._state
    L, B, E, k = model.L, docs.shape[0], model.E, model.k
    model.ids = torch.empty(L, B, 1, k, dtype=torch.long, device=docs.device)
    model.h = torch.empty(L, B, 1, E, dtype=torch.float32, device=docs.device)
    seed_hash = int(rng.hash_keys(model.seed))  # the first key hashes on the host, as hash_keys does
    eps, gumbel, stick = purposes
    _szd_decode[(L, B)](
        seed_hash, docs, rows, positions, valid, s["base"], s["z"], s["prev"],
        model.ids, model.h, s["z"].shape[1], E, p.phi, math.sqrt(1 - p.phi**2), p.sigma_loc, p.p_stick,
        docs.stride(0), rows.stride(0), positions.stride(0), valid.stride(0),
        EPS=eps, GUMBEL=gumbel, STICK=stick, K=k, BLOCK=triton.next_power_of_2(E),
    )  # fmt: skip
