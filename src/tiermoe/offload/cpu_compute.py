"""Missed experts computed on the CPU, straight from the pinned host cache, while others cross PCIe.

A missed expert can reach the step two ways: copied into a GPU slot (PCIe, then the GPU computes it and
keeps it for later tokens) or computed where it already sits, on the CPU, with only the tokens' hidden
states crossing the bus. Both resources work at once, so the fastest step splits a layer's misses between
them: `split` balances the two queues from measured costs (`MissCosts`: seconds per expert on each path,
the CPU's growing with the tokens routed to the expert). Which misses take the CPU's share matters too:
a streamed expert is admitted to a slot and may hit later, a CPU-computed one is not, so the CPU gets the
misses routed least often lately (policy.RoutedCounts). The store issues the streamed copies first, then
computes the CPU share on the calling thread while they are in flight (torch's intra-op threads use the
cores), then waits for the copies, launches the GPU kernels and adds the CPU's sum.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.base import ExpertFormat
from ..formats.dense import DenseFormat
from ..formats.int4 import Int4Format
from ..formats.quantized import DequantizingFormat
from ..models.experts import SWIGLU
from . import cpu_kernels

TIMING_REPEATS = 5  # medians of this many runs measure each cost
# The CPU's cost is timed over distinct experts of at least this many bytes in all, more than any
# last-level cache, so each comes from DRAM as in decode. One expert timed again and again sits in the
# cache: measured on the H100 machine, it predicted 39 GB/s where decode got 20 (bench/NOTES.md s. 22).
COLD_BYTES = 512 * 2**20
SHARE_EXPERTS = 4  # experts a CPU call computes when its fixed cost is told from an expert's


@dataclass(frozen=True)
class MissCosts:
    """Seconds one missed expert costs on each path, measured on this machine for this expert format."""

    stream_s: float  # copied from the pinned host cache into a GPU slot (copy engine)
    cpu_s: float  # computed on the CPU for one token routed to it
    cpu_token_s: float  # added for each further token routed to it
    cpu_layer_s: float  # once per layer with CPU experts: hidden states' round trip and the add

    def cpu_cost(self, tokens: int) -> float:
        return self.cpu_s + (tokens - 1) * self.cpu_token_s

    def describe(self) -> str:
        return (
            f"miss costs: stream {self.stream_s * 1e6:.0f} us, CPU {self.cpu_s * 1e6:.0f} us "
            f"+ {self.cpu_token_s * 1e6:.0f} us a further token, {self.cpu_layer_s * 1e6:.0f} us a layer"
        )


def split(misses: dict[int, int], costs: MissCosts, stream_busy_s: float = 0.0) -> set[int]:
    """The misses (expert -> tokens routed to it) to compute on the CPU: each one, costliest first, goes to
    whichever queue would finish it sooner (longest-processing-time list scheduling), the CPU's queue
    starting at its per-layer cost and the stream's at `stream_busy_s` (copies already in flight)."""
    cpu_until, stream_until, on_cpu = costs.cpu_layer_s, stream_busy_s, set()
    for expert, tokens in sorted(misses.items(), key=lambda m: -costs.cpu_cost(m[1])):
        cpu_done = cpu_until + costs.cpu_cost(tokens)
        if cpu_done < stream_until + costs.stream_s:
            cpu_until = cpu_done
            on_cpu.add(expert)
        else:
            stream_until += costs.stream_s
    return on_cpu


def choose(
    routed: list[int],
    resident: Container[int],
    costs: MissCosts,
    in_host: Callable[[int], bool],
    freq: np.ndarray,
) -> set[int]:
    """The experts of one layer's routed ids (a decode step's) to compute on the CPU: of the misses (not
    resident on the GPU) already in host memory, as many as `split` gives the CPU, taking those routed
    least often lately (freq: this layer's counts before this step). The store and the planner's
    simulation both decide through this."""
    misses = {e: n for e, n in Counter(routed).items() if e not in resident and in_host(e)}
    if not misses:
        return set()
    share = len(split(misses, costs))
    return set(sorted(misses, key=lambda e: (freq[e], misses[e]))[:share])


def compute(
    fmt: ExpertFormat,
    x: torch.Tensor,
    pairs: dict[int, tuple[list[int], list[float]]],
    experts: dict,
    compiled: bool = True,
) -> torch.Tensor:
    """sum over the pairs of weight * expert(x[token]) on the CPU: x [T, H] in host memory, pairs expert ->
    (tokens, routing weights), experts expert -> its bytes (uint8 [nbytes], the host cache's entry).
    The compiled kernel where it computes these experts (compiled False: torch's path, to compare), else
    straight matmuls on each expert's views (quantized ones dequantized first): a decode step's CPU share
    is a few experts of one token each, where the generic per-pair path's sorting costs more than the
    expert (measured 5x on a small one)."""
    if compiled and (k := cpu_kernels.kernel()) is not None and _compiled_kind(fmt, k.simd()):
        return _compute_compiled(k, fmt, x, pairs, experts)
    # torch: per expert, its weights in the compute dtype (quantized ones dequantized first)
    out = torch.zeros_like(x)
    for expert, (tokens, weights) in pairs.items():
        if not tokens:  # an expert no token chose
            continue
        bank = fmt.views(experts[expert][None])
        gate_up, down = _weights(fmt, bank)
        b1, b2 = (None, None) if (biases := fmt.biases(bank)) is None else (biases[0][0], biases[1][0])
        xs = x[tokens]  # [n, H]
        gate, up = F.linear(xs, gate_up, b1).chunk(2, dim=-1)
        y = F.linear(fmt.kind.glu(gate, up), down, b2)  # [n, H], the expert's kind (gpt-oss: clamped GLU)
        if len(tokens) == 1:
            out[tokens[0]].add_(y[0], alpha=weights[0])
        else:
            out.index_add_(0, torch.tensor(tokens), y * torch.tensor(weights, dtype=y.dtype)[:, None])
    return out


def _compiled_kind(fmt: ExpertFormat, simd: str) -> bool:
    """Whether the compiled kernel computes these experts: SwiGLU without biases, 4-bit (sizes in
    multiples of 16, the lanes it computes together; torch's dequantizing path is 30x slower even where
    the build has no vector instructions) or bf16 where it has them (else torch's GEMV is as fast)."""
    if fmt.kind != SWIGLU:
        return False
    if isinstance(fmt, Int4Format):  # and groups of whole qweight rows (8 inputs a row)
        return fmt.hidden % 16 == 0 and fmt.inter % 16 == 0 and all(g % 8 == 0 for g in fmt.groups.values())
    return isinstance(fmt, DenseFormat) and fmt.dtype == torch.bfloat16 and simd != "none"


def _compute_compiled(kernel, fmt: ExpertFormat, x: torch.Tensor, pairs: dict, experts: dict) -> torch.Tensor:
    """compute's sum by the compiled kernel: every expert of the share in one call, in float32."""
    pairs = {e: p for e, p in pairs.items() if p[0]}  # an expert no token chose adds nothing
    if not pairs:
        return torch.zeros_like(x)
    bank = [experts[e] for e in pairs]  # whole experts: the kernel finds the parts at their offsets
    offsets, tokens, weights = [0], [], []
    for toks, ws in pairs.values():
        tokens += toks
        weights += ws
        offsets.append(len(tokens))
    routing = (
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(tokens, dtype=torch.int64),
        torch.tensor(weights, dtype=torch.float32),
    )
    x32 = x.float().contiguous()
    if isinstance(fmt, Int4Format):
        names = [f"{m}_{p}" for m in ("gate_up", "down") for p in ("qweight", "qzeros", "scales")]
        swiglu, groups = kernel.swiglu_int4, (fmt.groups["gate_up"], fmt.groups["down"])
    else:
        names, swiglu, groups = ["gate_up", "down"], kernel.swiglu_bf16, ()
    parts = [n for name in names for n in (fmt.part(name).offset, fmt.part(name).nbytes)]  # checked there
    return swiglu(x32, bank, parts, fmt.hidden, fmt.inter, *groups, *routing).to(x.dtype)


def _weights(fmt: ExpertFormat, bank: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's gate_up [2I, H] and down [H, I] in the compute dtype, from a bank of one."""
    if isinstance(fmt, DequantizingFormat):
        gate_up, down = fmt.dequantize(bank, torch.zeros(1, dtype=torch.long))
        return gate_up[0], down[0]
    return bank["gate_up"][0], bank["down"][0]


def _median_s(fn, repeats: int = TIMING_REPEATS) -> float:
    fn()  # warm-up: first-call allocations and thread start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_experts(nbytes: int, available: int) -> int:
    """How many distinct experts of `nbytes` each the CPU's cost is timed over (COLD_BYTES' worth)."""
    return max(1, min(available, -(-COLD_BYTES // nbytes)))


def measure(
    fmt: ExpertFormat, experts: list[torch.Tensor], slot: torch.Tensor, dtype: torch.dtype
) -> MissCosts:
    """MissCosts timed with real experts: experts their host bytes (pinned on a GPU machine; the CPU's
    costs are per expert over all of them, see COLD_BYTES), slot a GPU slot the first may be copied into
    (overwritten), dtype the compute dtype of the hidden states."""
    cuda = slot.is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize(slot.device)

    def stream():
        slot.copy_(experts[0], non_blocking=True)
        sync()

    def on_cpu(tokens: int, share: int):
        """Every expert computed for `tokens` tokens, `share` experts a call."""
        x = torch.randn(tokens, fmt.hidden, dtype=dtype)
        routed = (list(range(tokens)), [1.0] * tokens)
        calls = [dict(enumerate(experts[i : i + share])) for i in range(0, len(experts), share)]
        return lambda: [compute(fmt, x, dict.fromkeys(call, routed), call) for call in calls]

    x_gpu = torch.zeros(1, fmt.hidden, dtype=dtype, device=slot.device)
    x_host = torch.zeros(1, fmt.hidden, dtype=dtype, pin_memory=cuda)

    def round_trip():
        x_host.copy_(x_gpu, non_blocking=True)
        sync()
        x_gpu.add_(x_host.to(slot.device, non_blocking=True))
        sync()

    # A call's fixed cost f and an expert's own c, from calls of one expert (f + c each) and of SHARE_EXPERTS
    # (f / SHARE_EXPERTS + c each): a decode layer's share pays f once (with the round trip), c an expert
    # (34 us of f measured on the CPU machine, against 300-500 us of c for Qwen3's experts: section 39).
    alone, shared = (_median_s(on_cpu(1, n)) / len(experts) for n in (1, SHARE_EXPERTS))
    call = max(alone - shared, 0.0) * SHARE_EXPERTS / (SHARE_EXPERTS - 1)
    eight = _median_s(on_cpu(8, SHARE_EXPERTS)) / len(experts)
    return MissCosts(
        stream_s=_median_s(stream),
        cpu_s=alone - call,
        cpu_token_s=max(eight - shared, 0.0) / 7,
        cpu_layer_s=_median_s(round_trip) + call,
    )
