"""int4 decode kernels that exist outside tiermoe, for the kernel bench to compare ours with (issue 12
asks to keep the fastest): torch's tinygemm kernel (`torch._weight_int4pack_mm`, as gpt-fast and torchao
call it) and gemlite's A16W4 GEMV (Triton low-bit kernels; optional, `pip install gemlite`). Neither
groups experts, so a layer's decode step calls each routed expert's two projections in turn: the same
bytes as our grouped GEMV, twice the launches per expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GROUP = 128
TINYGEMM_INNER_K_TILES = 8  # gpt-fast's and torchao's choice for decode


def random_int4(n: int, k: int, g: torch.Generator, device: str) -> tuple:
    """Group-wise int4 weights [n, k] as (q uint8 0..15, scales bf16 [n, k / GROUP], zeros bf16 [n, k /
    GROUP], in q's units) and the float32 weights they stand for, w = (q - zeros) x scales."""
    q = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=g, device=device) * 0.004 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(6, 10, (n, k // GROUP), generator=g, device=device).to(torch.bfloat16)
    w = (q.float() - zeros.float().repeat_interleave(GROUP, 1)) * scales.float().repeat_interleave(GROUP, 1)
    return q, scales, zeros, w


def tinygemm(q, scales, zeros) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M, k] bf16 -> x @ w.T by torch's tinygemm, which dequantizes (q - 8) x scale + zero with the
    zero in weight units: zero = (8 - zeros) x scales gives our w."""
    packed = torch._convert_weight_to_int4pack(
        (q[:, ::2] << 4 | q[:, 1::2]).contiguous(), TINYGEMM_INNER_K_TILES
    )
    scale_zero = torch.stack([scales, (8 - zeros.float()).mul(scales.float()).to(torch.bfloat16)], dim=-1)
    scale_zero = scale_zero.transpose(0, 1).contiguous()  # [k / GROUP, n, 2]
    return lambda x: torch._weight_int4pack_mm(x, packed, GROUP, scale_zero)


def gemlite(q, scales, zeros) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M, k] bf16 -> x @ w.T by gemlite's A16W4 kernels (its HQQ convention is ours: (q - zeros) x
    scales)."""
    from gemlite import DType, GemLiteLinear

    n, k = q.shape
    linear = GemLiteLinear(
        4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.BF16, output_dtype=DType.BF16
    )
    linear.pack(q, scales, zeros, None)
    return linear


PEERS = {"torch tinygemm": tinygemm, "gemlite": gemlite}


def layer_step(make, hidden: int, inter: int, top_k: int, device: str = "cuda"):
    """(step, reference): one layer's decode step over top_k experts, each projection a linear built by
    `make`, and the same step in float32 from the weights the int4 values stand for."""
    g = torch.Generator(device=device).manual_seed(0)
    experts = [
        (random_int4(2 * inter, hidden, g, device), random_int4(hidden, inter, g, device))
        for _ in range(top_k)
    ]
    linears = [(make(*gate_up[:3]), make(*down[:3])) for gate_up, down in experts]
    x = torch.randn(1, hidden, generator=g, device=device).to(torch.bfloat16)

    def run(projections, dtype):
        out = torch.zeros(1, hidden, device=device, dtype=torch.float32)
        for gate_up, down in projections:
            a = gate_up(x.to(dtype)).float()  # [1, 2I]: gate, then up
            out += down((F.silu(a[:, :inter]) * a[:, inter:]).to(dtype)).float() / top_k
        return out

    reference = run(
        [(lambda v, w=gu[3]: v @ w.T, lambda v, w=d[3]: v @ w.T) for gu, d in experts], torch.float32
    )
    return (lambda: run(linears, torch.bfloat16)), reference
