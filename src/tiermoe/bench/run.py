"""`tiermoe bench`: tiermoe and its HF peers on one checkpoint, the same prompts and the same GPU caps.

Every setting is measured in its own process (measure.py). The result file holds one run object per
engine and setting (keys in report.RUN_KEYS), each with the provenance of the whole bench, and a PNG
of decode tok/s next to it. For capped runs the PCIe floor says how fast any engine could decode if
every expert the budget cannot hold had to cross PCIe each time it is used.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..hardware import decode_floor, h2d_bandwidth, missed_expert_bytes_per_token
from . import peers
from .measure import run_isolated
from .report import RESULTS_DIR, RUN_KEYS, plot_runs, run_metadata, timestamp, variant_name, write_json
from .shapes import bytes_per_element, expert_intermediate_size
from .synth import read_synth_info
from .workload import Workload

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8"}


def parse_budgets(values: list[str] | None) -> list[float | None]:
    """`--gpu-budget 4,none --gpu-budget 8` -> [4.0, None, 8.0]; "none" means uncapped."""
    budgets: list[float | None] = []
    for value in values or ["none"]:
        for item in value.split(","):
            item = item.strip().lower()
            if item in ("none", "uncapped"):
                budgets.append(None)
                continue
            try:
                budgets.append(float(item))
            except ValueError:
                raise InvalidRequestError(
                    f"--gpu-budget takes GiB numbers or 'none', got {item!r}", param="gpu_budget"
                ) from None
    return budgets


def parse_peers(value: str | None) -> list[str]:
    names = [p.strip() for p in (value or "").split(",") if p.strip()]
    unknown = [p for p in names if p not in peers.PEERS]
    if unknown:
        raise InvalidRequestError(
            f"unknown peer(s) {', '.join(unknown)}; peers are: {', '.join(peers.PEERS)}", param="peers"
        )
    return names


def measure_h2d(config: dict) -> float | None:
    """Pinned host-to-device GB/s in chunks of one expert, the transfer the offload path makes."""
    if not torch.cuda.is_available():
        return None
    chunk = 3 * config["hidden_size"] * expert_intermediate_size(config) * bytes_per_element(config)
    return h2d_bandwidth(chunk, pinned=True, total_bytes=1 << 30)


def pcie_floor(
    config: dict, gpu_budget_gib: float | None, batch: int, h2d_gb_s: float | None
) -> float | None:
    """Best decode tok/s (whole batch) if every expert use the budget cannot hold crosses PCIe."""
    if gpu_budget_gib is None or not h2d_gb_s:
        return None
    return decode_floor(
        missed_expert_bytes_per_token(config, gpu_budget_gib, batch), h2d_gb_s, None
    ).pcie_tok_s


def parse_variants(value: str | None) -> list[dict]:
    """`lru,lfu,lru-protect,lru+noprefetch` -> tiermoe options per variant (eviction policy, prefetch);
    None: the engine's defaults."""
    from ..config import EngineConfig
    from ..offload.policy import POLICIES

    if not value:
        defaults = EngineConfig()
        return [{"eviction": defaults.eviction, "prefetch": defaults.prefetch}]
    variants = []
    for item in value.split(","):
        policy, _, flag = item.strip().partition("+")
        if policy not in POLICIES or flag not in ("", "noprefetch"):
            raise InvalidRequestError(
                f"--variants items are POLICY or POLICY+noprefetch with POLICY one of {', '.join(POLICIES)}; "
                f"got {item!r}",
                param="variants",
            )
        variants.append({"eviction": policy, "prefetch": flag != "noprefetch"})
    return variants


def _settings(
    budgets: list[float | None], peer_names: list[str], variants: list[dict]
) -> list[tuple[str, float | None, dict | None]]:
    """tiermoe at every budget (every variant when capped: they only differ when experts move); hf
    once, uncapped (it cannot be capped); hf-offload at every cap."""
    settings = [("tiermoe", b, v) for b in budgets for v in (variants if b is not None else variants[:1])]
    if "hf" in peer_names:
        settings.append(("hf", None, None))
    if "hf-offload" in peer_names:
        caps = [b for b in budgets if b is not None]
        settings += [("hf-offload", b, None) for b in caps] or [("hf-offload", None, None)]  # None: skipped
    return settings


def bench(
    model_dir: str | Path,
    workload: Workload,
    gpu_budgets: list[float | None],
    peer_names: list[str],
    cpu_budget_gib: float | None = None,
    peer_gen_len: int | None = None,
    peer_repeat: int | None = None,
    timeout_s: float = 600,
    device: str | None = None,
    dtype: str | None = None,
    h2d_gb_s: float | None = None,
    variants: list[dict] | None = None,
    argv: list[str] | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Measure every setting and return {"runs": [...], ...}; writes nothing."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise InvalidRequestError(
            f"{model_dir} has no config.json; write one with `tiermoe synth`", param="model"
        )
    config = json.loads(config_path.read_text())
    info = read_synth_info(model_dir)
    common = {
        "model_preset": info.get("preset", model_dir.name),
        "experts_dtype": info.get("dtype")
        or _DTYPE_NAMES.get(config.get("torch_dtype", ""), config.get("torch_dtype")),
        "cpu_budget_gib": cpu_budget_gib,
        "batch": workload.batch,
        "prompt_len": workload.prompt_len,
        **run_metadata(argv),
    }
    peer_workload = Workload(
        workload.prompt_len,
        peer_gen_len or workload.gen_len,
        workload.batch,
        peer_repeat or workload.repeat,
        workload.seed,
    )
    results = []
    for engine, budget, options in _settings(gpu_budgets, peer_names, variants or parse_variants(None)):
        w = workload if engine == "tiermoe" else peer_workload
        budget_text = "uncapped" if budget is None else f"{budget:g} GiB"
        variant = (
            ""
            if options is None
            else f" ({options['eviction']}, prefetch {'on' if options['prefetch'] else 'off'})"
        )
        progress(
            f"bench: {engine}{variant} at GPU {budget_text}, batch {w.batch}, {w.prompt_len}+{w.gen_len} tokens, {w.repeat} runs"
        )
        figures = run_isolated(
            engine,
            model_dir,
            w,
            budget,
            cpu_budget_gib,
            timeout_s,
            device if engine == "tiermoe" else None,
            dtype if engine == "tiermoe" else None,
            options,
        )
        if figures.get("error"):
            progress(f"bench: {engine}: {figures['error']}")
        run = {
            **common,
            "engine": engine,
            "gpu_budget_gib": budget,
            **(options or {}),
            "gen_len": w.gen_len,
            "repeat": w.repeat,
            **figures,
        }
        if w.gen_len != workload.gen_len:
            run["gen_len_requested"] = workload.gen_len  # peers' length was capped with --peer-gen-len
        results.append(run)

    # Measured last, so this process holds no CUDA context while the engines run.
    h2d = h2d_gb_s if h2d_gb_s is not None else measure_h2d(config)
    for run in results:
        capped_tiermoe = run["engine"] == "tiermoe" and run["gpu_budget_gib"] is not None
        run["pcie_floor_tok_s"] = (
            pcie_floor(config, run["gpu_budget_gib"], workload.batch, h2d) if capped_tiermoe else None
        )
        for key in RUN_KEYS:
            run.setdefault(key, None)
    return {"runs": results, "model_dir": str(model_dir), "h2d_gb_s": h2d, "seed": workload.seed}


def _summary_table(runs: list[dict]):
    from rich.table import Table

    table = Table(title="tiermoe bench")
    for col in (
        "engine",
        "GPU cap",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "TTFT s",
        "peak GPU GiB",
        "PCIe floor",
        "note",
    ):
        table.add_column(col)

    def fmt(v, spec=",.2f"):
        return "-" if v is None else format(v, spec)

    for r in runs:
        cap = "none" if r["gpu_budget_gib"] is None else f"{r['gpu_budget_gib']:g}"
        table.add_row(
            f"{r['engine']} {variant_name(r)}".strip(), cap, str(r["batch"]), fmt(r["prefill_tok_s"], ",.1f"), fmt(r["decode_tok_s"]),
            fmt(r["ttft_s"], ".3f"), fmt(r["peak_gpu_gib"]), fmt(r["pcie_floor_tok_s"]), (r["error"] or "")[:60],
        )  # fmt: skip
    return table


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    workload = Workload(args.prompt_len, args.gen_len, args.batch, args.repeat, args.seed)
    payload = bench(
        args.model,
        workload,
        parse_budgets(args.gpu_budget),
        parse_peers(args.peers),
        cpu_budget_gib=args.cpu_budget,
        peer_gen_len=args.peer_gen_len,
        peer_repeat=args.peer_repeat,
        timeout_s=args.timeout,
        device=args.device,
        dtype=args.dtype,
        h2d_gb_s=args.h2d_gb_s,
        variants=parse_variants(args.variants),
        progress=console.print,
    )
    runs = payload["runs"]
    stem = args.name or f"bench-{runs[0]['model_preset']}-b{workload.batch}-{timestamp()}"
    out_dir = Path(args.out_dir)
    json_path = write_json(out_dir / f"{stem}.json", payload)
    title = (
        f"{runs[0]['model_preset']} ({runs[0]['experts_dtype']}), batch {workload.batch}, {runs[0]['device']}"
    )
    png_path = plot_runs(runs, out_dir / f"{stem}.png", title)
    console.print(_summary_table(runs))
    for r in runs:
        if r["experts"]:
            cap = "uncapped" if r["gpu_budget_gib"] is None else f"{r['gpu_budget_gib']:g} GiB"
            console.print(f"expert store, {r['engine']} at {cap}: {json.dumps(r['experts'])}")
    console.print(f"saved {json_path} and {png_path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time tiermoe and HF peers; JSON and PNG under bench/results/")
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. from `tiermoe synth`)")
    p.add_argument(
        "--gpu-budget", action="append", help="GiB, comma-separated or repeated; 'none' = uncapped"
    )
    p.add_argument("--cpu-budget", type=float, default=None, help="pinned host cache, GiB")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up; figures are medians")
    p.add_argument("--peers", default="", help="comma-separated: hf, hf-offload")
    p.add_argument(
        "--peer-gen-len", type=int, default=None, help="shorter generation for slow peers (recorded)"
    )
    p.add_argument("--peer-repeat", type=int, default=None, help="timed runs for peers (default: --repeat)")
    p.add_argument(
        "--variants",
        default=None,
        help="tiermoe settings to compare when capped: POLICY or POLICY+noprefetch, comma-separated "
        "(e.g. lru,lfu,lru-protect,lru+noprefetch; default: the engine's own, lfu without prefetch)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per engine and setting")
    p.add_argument("--device", default=None, help="tiermoe device: cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="tiermoe compute dtype: bf16 or fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--h2d-gb-s", type=float, default=None, help="PCIe GB/s for the floor (default: measured)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument(
        "--name", default=None, help="file stem of the JSON and PNG (default: bench-<preset>-<date>)"
    )
    p.set_defaults(func=main)
    return p
