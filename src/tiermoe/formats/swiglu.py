"""SwiGLU experts over a stacked weight bank, in plain torch: the reference every faster kernel must match.

Two schedules: for few (token, expert) pairs (decode) gather the chosen experts and run one batched
matmul, with no host synchronisation; for many (prefill) group the pairs by expert, so each expert's
weights are read once for all of its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this many (token, expert) pairs the gathered copy of weights costs more than a per-expert loop.
GATHER_MAX_PAIRS = 16


def expert_mlp(
    x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """x [T, H]; slots, weights [T, k] (slots index the bank); gate_up [S, 2I, H]; down [S, H, I]."""
    t, k = slots.shape
    if t * k <= GATHER_MAX_PAIRS:
        return _gathered(x, slots, weights, gate_up, down)
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)
    return accumulate_pairs(
        x, tokens, slots.reshape(-1), weights.reshape(-1), gate_up, down, torch.zeros_like(x)
    )


def _gathered(x, slots, weights, gate_up, down):
    t, k = slots.shape
    flat = slots.reshape(-1)
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # [T*k, H, 1]
    h = torch.bmm(gate_up[flat], xs)[:, :, 0]  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(down[flat], (F.silu(gate) * up)[:, :, None])[:, :, 0]  # [T*k, H]
    return (y.view(t, k, -1) * weights[:, :, None]).sum(dim=1)


def accumulate_pairs(
    x: torch.Tensor,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[tokens[i]] += weights[i] * expert_{slots[i]}(x[tokens[i]]) for every pair i, expert by expert."""
    order = torch.argsort(slots)
    used, counts = torch.unique_consecutive(slots[order], return_counts=True)
    tokens, weights = tokens[order], weights[order]
    start = 0
    for slot, n in zip(used.tolist(), counts.tolist(), strict=True):
        tok = tokens[start : start + n]
        gate, up = F.linear(x[tok], gate_up[slot]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[slot]) * weights[start : start + n, None]
        out.index_add_(0, tok, y)
        start += n
    return out
