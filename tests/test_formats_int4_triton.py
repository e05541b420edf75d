"""The int4 grouped GEMV (Triton) against the format's torch reference: compiled on a GPU, and without
one in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tiermoe.formats import int4_triton
from tiermoe.formats.int4 import Int4Format

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"


def random_bank(fmt: Int4Format, slots: int) -> dict:
    bank = fmt.empty(slots, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for s in range(slots):
        fmt.fill_random(bank[s], g, 0.05)
    return fmt.views(bank)


@pytest.mark.parametrize(("hidden", "inter", "group"), [(64, 32, 16), (128, 96, -1), (256, 128, 128)])
def test_grouped_gemv_matches_the_torch_reference(hidden, inter, group):
    dtype = torch.bfloat16 if CUDA else torch.float32
    fmt = Int4Format(hidden, inter, dtype, group)
    bank = random_bank(fmt, 5)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    slots = torch.tensor([[0, 4], [2, 2], [1, 3]], device=DEVICE)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], device=DEVICE, dtype=dtype)
    got = int4_triton.int4_mlp(fmt, x, slots, weights, bank).float()
    # the reference: the experts dequantized, in float32
    ref_fmt = Int4Format(hidden, inter, torch.float32, group)
    ref = super(Int4Format, ref_fmt).mlp(x.float(), slots, weights.float(), bank)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if not CUDA else 1e-2), rel
    if CUDA:  # the format's own decode path is this kernel
        assert torch.equal(fmt.mlp(x, slots, weights, bank).float(), got)
