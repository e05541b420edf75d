"""Time one engine at one setting in a process of its own.

Every measured setting (tiermoe at each budget, each HF peer) runs as
`python -m tiermoe.bench.measure --engine ...`, writing its figures as JSON: its memory is returned
when it exits, its peak host RSS (ru_maxrss is a high-water mark for the whole process) is its own,
and an OOM, a crash or a run past the time limit becomes an error in the result file instead of
ending the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import peers
from .report import DECODE_TRAFFIC
from .workload import Workload, median_figures, random_prompts

ENGINES = ("tiermoe", *peers.PEERS)
GB = 1e9
GIB = 1 << 30
LARGEST_BLOCKS = 8  # held_gpu_memory's largest allocated blocks listed
# Like the timing figures, a run's traffic is the median of its timed runs.
TRAFFIC = (*DECODE_TRAFFIC, "prefill_h2d_bytes")


def decode_traffic(stats: dict) -> dict:
    """Expert-store traffic of one generate call per decoded token, over the decode steps only (prefill
    touches nearly every expert and would swamp the per-token picture). stats: GenerationStats fields
    sequences, completion_tokens (the whole batch's), decode_s and experts_decode. Decoded tokens are
    completion_tokens - sequences, as in decode_tok_s: each sequence's first token comes out of prefill.
    h2d_gb_s is achieved (decode H2D bytes / decode time), not the link's ceiling. H2D bytes are every
    byte of experts over PCIe: copied into slots, and read in place by the kernels (miss_path in-place and staged).
    None when nothing is offloaded (no store statistics) or nothing was decoded."""
    e = stats.get("experts_decode") or {}
    tokens = stats["completion_tokens"] - stats["sequences"]
    if "bytes_h2d" not in e or tokens <= 0:
        return dict.fromkeys(DECODE_TRAFFIC)
    pcie = _pcie_bytes(e)
    return {
        "gpu_hit_rate": e.get("gpu_hit_rate"),
        "h2d_bytes_per_token": pcie / tokens,
        "disk_bytes_per_token": e["bytes_disk"] / tokens,
        "h2d_gb_s": pcie / stats["decode_s"] / GB if stats["decode_s"] > 0 else None,
        # where routed experts were served: GPU slots, over PCIe (copied, or read in place), the CPU; disk reads
        "gpu_experts_per_token": (e.get("gpu_hits", 0) + e.get("prefetch_hits", 0)) / tokens,
        "pcie_experts_per_token": e.get("gpu_misses", 0) / tokens,
        "cpu_experts_per_token": e.get("cpu_computed", 0) / tokens,
        "disk_experts_per_token": e.get("host_misses", 0) / tokens,
        "cpu_ms_per_token": e.get("cpu_s", 0.0) * 1000 / tokens,
    }


def prefill_traffic(stats: dict) -> dict:
    """prefill_h2d_bytes: expert bytes over PCIe during the prefill (the whole call's less decode's),
    None when nothing is offloaded."""
    e, d = stats.get("experts") or {}, stats.get("experts_decode") or {}
    if "bytes_h2d" not in e:
        return {"prefill_h2d_bytes": None}
    return {"prefill_h2d_bytes": _pcie_bytes(e) - _pcie_bytes(d)}


def _pcie_bytes(stats: dict) -> int:
    """Expert bytes over PCIe: copied into slots, and read in place by the kernels (miss_path in-place and staged)."""
    return stats.get("bytes_h2d", 0) + stats.get("bytes_in_place", 0)


def median_traffic(samples: list[dict]) -> dict:
    out = {}
    for key in TRAFFIC:
        values = [s[key] for s in samples if s.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def measure_tiermoe(
    model_dir: str,
    workload: Workload,
    gpu_budget_gib: float | None,
    cpu_budget_gib: float | None,
    device: str | None = None,
    dtype: str | None = None,
    options: dict | None = None,
    batches: list[int] | None = None,
    measured: Callable[[dict], None] | None = None,
) -> dict:
    """Load tiermoe, warm up, time workload.repeat generate calls; figures are medians, expert-store
    statistics those of the last timed run. options: further LLM keywords (eviction, prefetch, routing,
    record_routing). The routing in force is read back from the LLM, so a default is recorded by name.
    batches: a concurrency sweep on one load (a Qwen3 load is 40-75 s): the workload at each number of
    sequences in turn, {"sweep": [figures of each]}, every one with the same engine (its max_num_seqs and
    KV reserve those of the largest), its own prompts (none a batch before ran), its own error (an OOM at
    64 sequences leaves the others' figures), and `measured` given the sweep so far after each batch.
    peak_host_gib is the process's high-water mark, so in a sweep it is the largest so far."""
    from .. import LLM

    # Budgets are passed only when set, so an uncapped run needs nothing beyond the basic LLM(...).
    budgets = {"gpu_budget_gib": gpu_budget_gib, "cpu_budget_gib": cpu_budget_gib}
    start = time.perf_counter()
    budgets = {k: v for k, v in budgets.items() if v is not None}
    # Every sequence of the batch decodes at once (the KV reserve for them comes with the options:
    # run.kv_reserve_for).
    options = {"max_num_seqs": max(max(batches or [workload.batch]), 16), **(options or {})}
    llm = LLM(model_dir, device=device, dtype=dtype, **budgets, **options)
    plan = llm.plan
    setup = {
        "load_s": time.perf_counter() - start,
        # where the GPU budget went, GiB: the peak less dense, KV and experts is what the workspace held
        "plan_gib": {
            "budget": None if plan.budget_bytes is None else plan.budget_bytes / GIB,
            "dense": plan.dense_bytes / GIB,
            "kv": plan.kv_bytes / GIB,
            "workspace": plan.workspace_bytes / GIB,
            "experts": plan.gpu_slots * plan.expert_bytes / GIB,
        },
    }
    if path := getattr(llm.provider, "miss_path", None):  # what auto chose (the run's options say auto)
        setup["miss_path"] = path
    if options.get("cpu_compute"):  # built by the load's cost measurement, so no build is timed here
        from ..offload import cpu_kernels

        setup["cpu_kernel"] = cpu_kernels.status()
    if batches is None:
        return _timed(llm, model_dir, workload, setup)
    result = {"sweep": [], "error": None}
    for i, batch in enumerate(batches):
        try:
            figures = _timed(llm, model_dir, replace(workload, batch=batch), setup, i * (workload.repeat + 1))
        except torch.OutOfMemoryError as e:
            figures = {"error": f"out of GPU memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # this batch's error; the next may still run
            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {e}"}
        result["sweep"].append(figures)
        if measured:
            measured(result)
    return result


def _timed(llm, model_dir: str, workload: Workload, setup: dict, first_run: int = 0) -> dict:
    """measure_tiermoe's figures of one workload on a loaded LLM (with `setup`'s: load_s, cpu_kernel); its
    prompts are random_prompts' runs first_run (the warm-up) to first_run + repeat."""
    from .. import SamplingParams

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    warm_prompts = random_prompts(vocab, workload, first_run)
    llm.generate([p[: min(8, workload.prompt_len)] for p in warm_prompts], warm)
    params = SamplingParams(max_tokens=workload.gen_len, temperature=0.0, ignore_eos=True)
    samples = []
    for run in range(first_run + 1, first_run + workload.repeat + 1):
        outs = llm.generate(random_prompts(vocab, workload, run), params)
        lengths = {len(o.token_ids) for o in outs}
        if lengths != {workload.gen_len}:
            raise RuntimeError(
                f"tiermoe returned {sorted(lengths)} tokens per sequence, asked for {workload.gen_len}"
            )
        stats = outs[0].stats
        sample = {
            "ttft_s": stats.ttft_s,
            "prefill_tok_s": stats.prefill_tok_s,
            "decode_tok_s": stats.decode_tok_s,
            "decode_s": stats.decode_s,
            "completion_tokens": stats.completion_tokens,
            "sequences": stats.sequences,
            "peak_gpu_gib": stats.peak_gpu_gib,
            "peak_host_gib": stats.peak_host_gib,
            "experts": stats.experts,
            "experts_decode": stats.experts_decode,
        }
        samples.append({**sample, **decode_traffic(sample), **prefill_traffic(sample)})
    return {
        **median_figures(samples),
        "held_gpu_gib": held_gpu_memory(llm.device),
        **median_traffic(samples),
        "experts": samples[-1]["experts"],
        "experts_decode": samples[-1]["experts_decode"],
        "routing": llm.routing_mode,
        "routing_params": llm.routing_params,
        "samples": samples,
        **setup,
        "error": None,
    }


def held_gpu_memory(device: torch.device) -> dict | None:
    """GiB the GPU holds between steps: the caching allocator's default pool, allocated (weights, KV,
    slots; what a step freed is reusable) apart from the CUDA graphs' pools, whole (their replays write
    every captured temporary there, allocated or not), and everything reserved; the default pool's
    allocated blocks that hold the most, [MiB a block, blocks]. None off the GPU."""
    if device.type != "cuda":
        return None
    held = {"default": 0, "graphs": 0}
    blocks = Counter()  # the default pool's allocated blocks by size: which tensors the plan did not count
    index = device.index if device.index is not None else torch.cuda.current_device()
    for segment in torch.cuda.memory_snapshot():
        if segment.get("device", index) != index:
            continue
        if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0):
            held["default"] += segment["allocated_size"]
            blocks.update(
                b["size"] for b in segment.get("blocks", ()) if b.get("state") == "active_allocated"
            )
        else:
            held["graphs"] += segment["total_size"]
    reserved = torch.cuda.memory_reserved(device)
    largest = sorted(blocks.items(), key=lambda item: -item[0] * item[1])[:LARGEST_BLOCKS]
    return {pool: size / GIB for pool, size in held.items()} | {
        "reserved": reserved / GIB,
        "default_largest_mib": [[round(size / 2**20, 2), count] for size, count in largest],
    }


def run_isolated(
    engine: str,
    model_dir: str | Path,
    workload: Workload,
    gpu_budget_gib: float | None = None,
    cpu_budget_gib: float | None = None,
    timeout_s: float = 600,
    device: str | None = None,
    dtype: str | None = None,
    options: dict | None = None,
    batches: list[int] | None = None,
) -> dict:
    """Measure one engine in a child process; returns its figures, or {"error": ...} when it was
    skipped, crashed, was killed (OOM) or ran past timeout_s. batches (tiermoe): a sweep on one load,
    {"sweep": [...]} (measure_tiermoe)."""
    if engine in peers.PEERS and (reason := peers.skip_reason(engine, str(model_dir), gpu_budget_gib)):
        return {"error": f"skipped: {reason}"}
    with tempfile.TemporaryDirectory(prefix="tiermoe-measure-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "tiermoe.bench.measure", "--engine", engine, "--model", str(model_dir),
            "--prompt-len", str(workload.prompt_len), "--gen-len", str(workload.gen_len),
            "--batch", str(workload.batch), "--repeat", str(workload.repeat), "--seed", str(workload.seed),
            "--out", str(out),
        ]  # fmt: skip
        for flag, value in (
            ("--gpu-budget", gpu_budget_gib),
            ("--cpu-budget", cpu_budget_gib),
            ("--device", device),
            ("--dtype", dtype),
            ("--options", json.dumps(options) if options else None),
            ("--sweep", ",".join(map(str, batches)) if batches else None),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        # The child must import this same tiermoe, installed or not.
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            # A sweep keeps the batches it finished (the child rewrites its file after each).
            return _partial(out, f"timed out after {timeout_s:g} s")
        if out.exists() and proc.returncode >= 0:
            return json.loads(out.read_text())
        if proc.returncode < 0:
            return _partial(out, f"killed by signal {-proc.returncode} (out of memory?)")
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'}"}


def _partial(out: Path, error: str) -> dict:
    """What a child that did not finish left: a sweep's finished batches with `error` as the result of
    the rest (measure's sweep file), else the error alone."""
    if out.exists():
        done = json.loads(out.read_text())
        if "sweep" in done:
            return {**done, "error": error}
    return {"error": error}


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tiermoe.bench.measure", description="time one engine; JSON to --out"
    )
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-budget", type=float, default=None)
    p.add_argument("--cpu-budget", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--options", default=None, help="JSON object of further LLM keywords")
    p.add_argument(
        "--sweep", default=None, help="tiermoe: batch sizes timed in turn on one load, e.g. 1,4,16"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    workload = Workload(a.prompt_len, a.gen_len, a.batch, a.repeat, a.seed)
    try:
        if a.engine == "tiermoe":
            options = json.loads(a.options) if a.options else None
            sweep = [int(b) for b in a.sweep.split(",")] if a.sweep else None
            result = measure_tiermoe(
                a.model, workload, a.gpu_budget, a.cpu_budget, a.device, a.dtype, options, sweep,
                lambda so_far: Path(a.out).write_text(json.dumps(so_far, indent=2) + "\n"),
            )  # fmt: skip
        else:
            result = peers.measure(a.engine, a.model, workload, a.gpu_budget, a.cpu_budget)
    except torch.OutOfMemoryError as e:
        result = {"error": f"out of GPU memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # recorded in the result file; the bench goes on with the next setting
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
