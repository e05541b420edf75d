"""`python -m tiermoe.bench.timeline`: a torch-profiler timeline of a few decode steps, how much of the
copy stream's time overlaps the compute stream's, and the kernels a step launches.

    python -m tiermoe.bench.timeline --model DIR --gpu-budget 8|none [--miss-path in-place|staged] [--tokens 4] [--batch 16]

Writes the Chrome trace (open it in chrome://tracing or Perfetto) to bench/results/timeline-<date>.json
beside a summary: the decode steps' wall time, the time kernels ran, the time host-to-device copies ran
and the share of copy time during which a kernel ran too (one stream is serial if that share is 0), the
kernels launched a step and the ones that took the most time. Uncapped, the step's wall time less its
kernel time is what launches and the host cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import MISS_PATHS
from ..provenance import RESULTS_DIR, run_metadata, timestamp, write_json


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def overlap_summary(trace: dict) -> dict:
    """From a Chrome trace's GPU events: microseconds of kernels (any stream), of host-to-device copies,
    and of copy time during which some kernel ran (intervals merged, so concurrent kernels count once)."""
    kernels, copies = [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if e.get("cat") == "kernel":
            kernels.append(span)
        elif e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""):
            copies.append(span)
    k, c = _union(kernels), _union(copies)
    both = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in k for a2, b2 in c)
    copy_us = sum(b - a for a, b in c)
    return {
        "kernel_us": sum(b - a for a, b in k),
        "h2d_copy_us": copy_us,
        "h2d_overlapped_us": both,
        "h2d_overlap_share": both / copy_us if copy_us else None,
    }


TOP_KERNELS = 40
FIRST_LAUNCHES = 160  # a step's first launches in order: its prologue and first layers, the fusion targets
NAME_CHARS = 100  # torch's templated kernel names run to thousands of characters


def kernel_census(trace: dict, steps: int) -> dict:
    """Kernels a decode step launches (all the trace's kernels over its steps), the kernels that took
    the most time (name, launches and microseconds in all, the most first), and the trace's first
    launches in time order (names cut short)."""
    by_name: dict[str, list[float]] = {}
    launches = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel" and "dur" in e:
            by_name.setdefault(e.get("name", "?"), []).append(float(e["dur"]))
            launches.append((float(e["ts"]), e.get("name", "?")[:NAME_CHARS]))
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    return {
        "kernels_per_step": sum(len(v) for v in by_name.values()) / steps if steps else None,
        "top_kernels": [{"name": n, "launches": len(v), "us": sum(v)} for n, v in top],
        "first_launches": [name for _, name in sorted(launches)[:FIRST_LAUNCHES]],
    }


def start_decoding(engine, prompts: list[list[int]], tokens: int) -> list:
    """Queue one request per prompt and step the engine until every one has its first token (a prompt
    that ends its prefill early decodes meanwhile), each with room for `tokens` decode steps after the
    last one starts and never stopped early: the next `tokens` steps decode every request. Returns the
    requests (abort them after)."""
    from ..engine.request import SamplingParams

    # A step prefills at least one prompt token, so no request decodes more steps than the prompts' tokens
    # before the last one starts.
    params = SamplingParams(max_tokens=tokens + 1 + sum(map(len, prompts)), ignore_eos=True)
    requests = [engine.add_request(p, params, i) for i, p in enumerate(prompts)]
    started: set[int] = set()
    while len(started) < len(requests):
        started |= {e.request_id for e in engine.step() if e.token_id is not None}
    return requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiermoe.bench.timeline", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument(
        "--gpu-budget", required=True, help="GiB (a capped run moves experts), or none: every expert resident"
    )
    p.add_argument("--miss-path", default="auto", choices=MISS_PATHS)
    p.add_argument("--routing", default=None, help="as tiermoe bench (default: szd on synthetic checkpoints)")
    p.add_argument("--tokens", type=int, default=4, help="decode steps to profile (after a warm-up)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: the timeline needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from .. import LLM, SamplingParams

    budget = None if args.gpu_budget == "none" else float(args.gpu_budget)
    llm = LLM(args.model, gpu_budget_gib=budget, miss_path=args.miss_path, routing=args.routing,
              max_num_seqs=max(args.batch, 16))  # fmt: skip
    prompts = [[100 + (7 * i + j) % 900 for j in range(64)] for i in range(args.batch)]
    llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # graphs captured, caches warm
    out = Path(args.out or RESULTS_DIR / f"timeline-{timestamp()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = llm.engine
    requests = start_decoding(engine, prompts, args.tokens)
    before = engine.provider.stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.tokens):
            engine.step()
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - start
    for r in requests:
        engine.abort(r)
    prof.export_chrome_trace(str(out))
    summary = {
        "decode_s": decode_s,
        "decode_steps": args.tokens,
        "batch": args.batch,
        "miss_path": getattr(llm.provider, "miss_path", args.miss_path),  # what auto chose
        "gpu_budget_gib": budget,
        "experts_decode": engine.provider.stats(since=before),
        **overlap_summary(trace := json.loads(out.read_text())),
        **kernel_census(trace, args.tokens),
        **run_metadata(argv),
    }
    path = write_json(out.with_name(out.stem + "-summary.json"), summary)
    share = summary["h2d_overlap_share"]
    print(
        f"{args.tokens} decode steps in {summary['decode_s'] * 1000:.1f} ms: kernels {summary['kernel_us'] / 1000:.1f} ms, "
        f"H2D copies {summary['h2d_copy_us'] / 1000:.1f} ms, {'-' if share is None else f'{share:.0%}'} of it "
        f"overlapped by kernels; {summary['kernels_per_step']:.0f} kernels a step; trace {out}, summary {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
