"""`python -m tiermoe.bench.kernels`: each expert format's decode path on the GPU at real expert shapes:
time per layer step (batch 1, top-k distinct experts from a bank of resident slots), the bytes it reads,
achieved GB/s against the measured HBM copy bandwidth, and its error against the torch reference
(experts dequantized to float32). Writes bench/results/kernels-<date>.json.

`--sweep` times every format's grouped GEMV launches instead (triton_kernels.GemvConfig: tile
sizes, K split, warps) per projection at those shapes, by coordinate descent from the launch rule, and
writes bench/results/kernels-sweep-<date>.json; `--save` also makes the winners this machine's launches
(~/.cache/tiermoe/gemv_tuned.json, read by the engine; formats/gemv_tuned.json ships those we measured).
Without --sweep, int4 kernels that exist elsewhere run the same layer step beside ours (bench/int4_peers.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ..engine.runner import capture
from ..formats.dense import DenseFormat
from ..formats.fp4 import Nvfp4Format
from ..formats.fp8 import Fp8BlockFormat
from ..formats.int4 import Int4Format
from ..formats.mxfp4 import Mxfp4Format
from ..formats.quantized import DequantizingFormat
from ..formats.swiglu import expert_mlp
from ..hardware import gpu_copy_bandwidth, time_cpu, time_cuda
from ..provenance import RESULTS_DIR, run_metadata, timestamp, write_json

SHAPES = {"olmoe-1b-7b": (2048, 1024, 8), "qwen3-30b-a3b": (2048, 768, 8)}  # hidden, expert inter, top-k
SLOTS = 64


def _time_ms(fn, iters: int) -> float:
    """Milliseconds per call: on the GPU a captured CUDA graph's replay timed with events (the engine
    replays decode as a graph, so eager timing would measure the host's launch rate, not the kernels),
    wall time on the CPU (the smoke test)."""
    if not torch.cuda.is_available():
        return time_cpu(fn, min_s=0.01) * 1000
    return time_cuda(capture(fn).graph.replay, iters) * 1000


def measure(fmt, top_k: int, device: str = "cuda", iters: int = 200) -> dict:
    """One format's decode step over top_k distinct experts of a bank of SLOTS random ones."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    views = random_bank(fmt, device)
    x = torch.randn(1, fmt.hidden, device=device, dtype=dtype)
    slots = torch.randperm(SLOTS, device=device)[:top_k][None]
    weights = torch.full((1, top_k), 1.0 / top_k, device=device, dtype=dtype)
    ms = _time_ms(lambda: fmt.mlp(x, slots, weights, views), iters)
    nbytes = top_k * fmt.nbytes
    got = fmt.mlp(x, slots, weights, views).float()
    # The reference: the experts in float32, through torch's SwiGLU (not the GEMV under test).
    if isinstance(fmt, DequantizingFormat):
        gate_up, down = fmt.dequantize(views, slots[0])
    else:
        gate_up, down = views["gate_up"][slots[0]], views["down"][slots[0]]
    pairs = torch.arange(top_k, device=device)[None]
    ref = expert_mlp(x.float(), pairs, weights.float(), gate_up.float(), down.float())
    return {
        "format": fmt.name, "hidden": fmt.hidden, "inter": fmt.inter, "top_k": top_k, "ms_per_layer": ms,
        "bytes_read": nbytes, "gb_s": nbytes / ms / 1e6, "rel_error": ((got - ref).norm() / ref.norm()).item(),
    }  # fmt: skip


# The sweep's axes, visited in this order from the rule's launch, each keeping the fastest so far.
SWEEP_AXES = {
    "split": (1, 2, 4, 8, 16),
    "block_n": (32, 64, 128, 256),
    "block_k": (16, 32, 64, 128),
    "warps": (1, 2, 4, 8),
}


def sweep_projection(fmt, prefix: str, pairs: int, device: str = "cuda", iters: int = 200) -> dict:
    """The fastest GemvConfig of one grouped GEMV (the format's kernel over the `prefix` projection of
    `pairs` distinct resident experts, each on its own input row), against the launch rule; every launch
    tried must give the rule's outputs."""
    from ..formats import triton_kernels

    views = random_bank(fmt, device)
    h, i = fmt.hidden, fmt.inter
    k, n, m = (h, i, 2) if prefix == "gate_up" else (i, h, 1)
    table = triton_kernels.slot_table(fmt, views)
    x = torch.randn(pairs, k, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    slots = torch.randperm(SLOTS, device=device)[:pairs]
    nbytes = pairs * sum(
        v[0].numel() * v.element_size() for name, v in views.items() if name.startswith(prefix)
    )

    def run(config):  # [pairs, m, n]: each pair its own input row (top_k 1), the splits summed
        return triton_kernels.project(fmt, x, slots, table, prefix, k, n, m, config).sum(dim=2)

    rule = triton_kernels.gemv_config(
        fmt.kernels, k, n, m, pairs, triton_kernels.gemv_quantum(fmt, prefix, k)[0]
    )
    expected = run(rule)
    tol = 1e-4 * expected.abs().max().item()
    times: dict = {}
    best = rule
    for axis, values in {"rule": (None,), **SWEEP_AXES}.items():
        for value in values:
            config = best if value is None else dataclasses.replace(best, **{axis: value})
            if config in times:
                continue
            try:
                got = run(config)
            except ValueError:  # a launch the format's scales or K do not allow
                continue
            if not torch.allclose(got, expected, rtol=1e-4, atol=tol):
                raise AssertionError(f"{fmt.kernels} {prefix}: {config} differs from {rule}")
            times[config] = _time_ms(lambda c=config: run(c), iters)
        best = min(times, key=times.get)
    return {
        "kernel": fmt.kernels, "projection": prefix, "k": k, "n": n, "m": m, "pairs": pairs, "bytes_read": nbytes,
        "rule": dataclasses.asdict(rule), "rule_us": times[rule] * 1000, "best": dataclasses.asdict(best),
        "best_us": times[best] * 1000, "best_gb_s": nbytes / times[best] / 1e6,
        "tried": [{**dataclasses.asdict(c), "us": t * 1000} for c, t in times.items()],
    }  # fmt: skip


def random_bank(fmt, device: str, slots: int | None = None, std: float = 0.02) -> dict:
    """The views of `slots` (default SLOTS) random experts, seeded: the bench, the sweep and the kernel
    tests see the same bytes."""
    slots = slots or SLOTS
    bank = fmt.empty(slots, device)
    g = torch.Generator(device=device).manual_seed(0)
    for s in range(slots):
        fmt.fill_random(bank[s], g, std)
    return fmt.views(bank)


def bench_formats(h: int, i: int) -> list:
    """Every expert format at one expert shape, bf16 compute, as the bench and the sweep run them."""
    return [
        DenseFormat(h, i, torch.bfloat16),
        Fp8BlockFormat(h, i, torch.bfloat16),
        Int4Format(h, i, torch.bfloat16, 128),
        Nvfp4Format(h, i, torch.bfloat16),
        Mxfp4Format(h, i, torch.bfloat16),
    ]


def sweep(pairs: int) -> list[dict]:
    runs = []
    for shape, (h, i, _) in SHAPES.items():
        for fmt in bench_formats(h, i):
            for prefix in ("gate_up", "down"):
                r = {"shape": shape, **sweep_projection(fmt, prefix, pairs)}
                runs.append(r)
                print(
                    f"{shape:14} {r['kernel']:6} {prefix:8} rule {r['rule_us']:6.1f} us, best {r['best_us']:6.1f} us "
                    f"({r['best_gb_s']:6.1f} GB/s) {r['best']}"
                )
    return runs


def tuned_entries(runs: list[dict]) -> list[dict]:
    """The sweep's winners as tuned-launch entries (triton_kernels.save_tuned) for this GPU."""
    gpu = torch.cuda.get_device_name()
    keys = ("kernel", "k", "n", "m", "pairs")
    return [{"gpu": gpu, **{k: r[k] for k in keys}, "config": r["best"]} for r in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiermoe.bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help=f"JSON file (default: {RESULTS_DIR}/kernels-<date>.json)")
    p.add_argument("--sweep", action="store_true", help="time the grouped GEMVs' launches instead")
    p.add_argument(
        "--pairs", type=int, default=8, help="(token, expert) pairs of a sweep's step (default: 8)"
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="with --sweep: this GPU's winners become the engine's launches here",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the kernel bench needs a CUDA GPU", file=sys.stderr)
        return 2
    hbm = gpu_copy_bandwidth(1 << 30)
    if args.sweep:
        runs = sweep(args.pairs)
        for r in runs:
            r["of_hbm"] = r["best_gb_s"] / hbm
        if args.save:
            from ..formats.triton_kernels import save_tuned

            print(f"tuned launches saved to {save_tuned(tuned_entries(runs))}")
        path = write_json(
            args.out or RESULTS_DIR / f"kernels-sweep-{timestamp()}.json",
            {"hbm_gb_s": hbm, "runs": runs, **run_metadata(argv)},
        )
        print(f"saved {path}")
        return 0
    runs = []
    for shape, (h, i, k) in SHAPES.items():
        for fmt in bench_formats(h, i):
            r = {"shape": shape, **measure(fmt, k)}
            r["of_hbm"] = r["gb_s"] / hbm
            runs.append(r)
            print(
                f"{shape:14} {r['format']:24} {r['ms_per_layer'] * 1000:8.1f} us  {r['gb_s']:7.1f} GB/s "
                f"({r['of_hbm']:.0%} of HBM {hbm:.0f})  rel error {r['rel_error']:.1e}"
            )
        runs += [r | ({"of_hbm": r["gb_s"] / hbm} if "gb_s" in r else {}) for r in int4_peers(shape, h, i, k)]
    path = write_json(
        args.out or RESULTS_DIR / f"kernels-{timestamp()}.json",
        {"hbm_gb_s": hbm, "runs": runs, **run_metadata(argv)},
    )
    print(f"saved {path}")
    return 0


def int4_peers(shape: str, h: int, i: int, top_k: int, iters: int = 200) -> list[dict]:
    """The same layer step by int4 kernels outside tiermoe (bench/int4_peers.py), each over the bytes of
    our int4 format at group 128; one that does not run (not installed, another torch) is reported."""
    from . import int4_peers as peers

    runs = []
    nbytes = top_k * Int4Format(h, i, torch.bfloat16, peers.GROUP).nbytes
    for name, make in peers.PEERS.items():
        r = {
            "shape": shape,
            "format": f"int4 (group {peers.GROUP}), {name}, per expert",
            "hidden": h,
            "inter": i,
        }
        try:
            step, reference = peers.layer_step(make, h, i, top_k)
            ms = _time_ms(step, iters)
            got = step()
            r |= {"ms_per_layer": ms, "bytes_read": nbytes, "gb_s": nbytes / ms / 1e6}
            r["rel_error"] = ((got - reference).norm() / reference.norm()).item()
            print(
                f"{shape:14} {r['format']:40} {ms * 1000:8.1f} us  {r['gb_s']:7.1f} GB/s  rel error {r['rel_error']:.1e}"
            )
        except Exception as e:  # a peer's failure is a figure of the comparison, not the bench's end
            r["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{shape:14} {r['format']:40} did not run: {r['error']}")
        runs.append(r)
    return runs


if __name__ == "__main__":
    sys.exit(main())
