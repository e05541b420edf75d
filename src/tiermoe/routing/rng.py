"""Counter-based random numbers: a pure function of integer keys (seed, document, layer, position, ...).

Routing emulation draws inside captured CUDA graphs and must give the same routing on the CPU, on the
GPU, eagerly and under a graph. A stateful generator gives none of that for free; hashing the keys does:
every draw is a few integer ops on tensors of keys, on whatever device the keys live.
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27, so a 32-bit value times it never overflows int64
_GOLDEN = 0x9E3779B9


def _mix(x):
    """A 32-bit avalanche hash of values in [0, 2**32): int64 tensors or Python ints alike."""
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    x = ((x ^ (x >> 16)) * _MUL) & _M32
    return x ^ (x >> 16)


def hash_keys(*keys: torch.Tensor | int) -> torch.Tensor:
    """One 32-bit hash per element of the broadcast of the keys (int64 tensors or ints, >= 0)."""
    h = None
    for k in keys:
        k = k & _M32  # Python ints (seeds, purposes) hash on the host, tensors on their device
        h = _mix((k + _GOLDEN) & _M32) if h is None else _mix((h * 31 + k + _GOLDEN) & _M32)
    return h


def uniform(h: torch.Tensor) -> torch.Tensor:
    """Hashes -> float32 in (0, 1): the top 24 bits, centred, so neither 0 nor 1 ever comes out."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel(h: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(h)))


def normal(h: torch.Tensor) -> torch.Tensor:
    """Standard normal by Box-Muller from two hashes derived from h."""
    u1, u2 = uniform(_mix(h ^ 0x5BD1E995)), uniform(_mix(h ^ 0x1B873593))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
