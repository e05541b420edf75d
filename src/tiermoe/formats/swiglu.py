"""SwiGLU experts over a stacked weight bank, in plain torch: the reference every faster kernel must match.
The expert's kind (models/experts.py) adds biases and gpt-oss's clamped GLU where the model has them.

Two schedules: for few (token, expert) pairs (decode) gather the chosen experts and run one batched
matmul, with no host synchronisation; for many (prefill) group the pairs by expert, so each expert's
weights are read once for all of its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.experts import SWIGLU, ExpertKind

Biases = tuple[torch.Tensor, torch.Tensor] | None  # (gate_up [S, 2I], down [S, H]) of a bank, or none

# Above this many (token, expert) pairs the gathered copy of weights costs more than a per-expert loop.
GATHER_MAX_PAIRS = 16
# Up to this many pairs a format with a grouped GEMM (CUDA) runs mlp without a host synchronisation, so a
# decode step of up to GROUPED_MAX_PAIRS / top_k sequences is one CUDA graph; prefills above it keep
# torch's per-expert loop (cuBLAS, for unquantized experts).
GROUPED_MAX_PAIRS = 4096


def skip_served(slots: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with a negative slot (served elsewhere: another wave, the CPU) pointed at a slot this call
    holds (the largest: a call has at least one pair its own), with weight 0, for the paths that read every
    pair's slot; no host synchronisation."""
    served = slots < 0
    return torch.where(served, slots.max(), slots), weights.masked_fill(served, 0)


def expert_mlp(
    x: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    kind: ExpertKind = SWIGLU,
    biases: Biases = None,
) -> torch.Tensor:
    """x [T, H]; slots, weights [T, k] (slots index the bank); gate_up [S, 2I, H]; down [S, H, I]."""
    t, k = slots.shape
    if t * k <= GATHER_MAX_PAIRS:
        return _gathered(x, slots, weights, gate_up, down, kind, biases)
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)
    return accumulate_pairs(
        x, tokens, slots.reshape(-1), weights.reshape(-1), gate_up, down, torch.zeros_like(x), kind, biases
    )


def _gathered(x, slots, weights, gate_up, down, kind: ExpertKind, biases: Biases):
    t, k = slots.shape
    flat = slots.reshape(-1)
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # [T*k, H, 1]
    h = torch.bmm(gate_up[flat], xs)[:, :, 0]  # [T*k, 2I]
    if biases is not None:
        h = h + biases[0][flat]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(down[flat], kind.glu(gate, up)[:, :, None])[:, :, 0]  # [T*k, H]
    if biases is not None:
        y = y + biases[1][flat]
    return (y.view(t, k, -1) * weights[:, :, None]).sum(dim=1)


def accumulate_pairs(
    x: torch.Tensor,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
    kind: ExpertKind = SWIGLU,
    biases: Biases = None,
) -> torch.Tensor:
    """out[tokens[i]] += weights[i] * expert_{slots[i]}(x[tokens[i]]) for every pair i, expert by expert
    (pairs with a negative slot, served elsewhere, skipped)."""
    order = torch.argsort(slots)
    used, counts = torch.unique_consecutive(slots[order], return_counts=True)
    tokens, weights = tokens[order], weights[order]
    start = 0
    for slot, n in zip(used.tolist(), counts.tolist(), strict=True):
        if slot < 0:
            start += n
            continue
        tok = tokens[start : start + n]
        b1, b2 = (None, None) if biases is None else (biases[0][slot], biases[1][slot])
        gate, up = F.linear(x[tok], gate_up[slot], b1).chunk(2, dim=-1)
        y = F.linear(kind.glu(gate, up), down[slot], b2) * weights[start : start + n, None]
        out.index_add_(0, tok, y)
        start += n
    return out
