"""`tiermoe routing-report FILE`: how a routing trace would cache, offline. With `--synthetic` instead of
a file, the trace comes from a routing model (uniform, szd) for `--sequences` documents decoded as one
batch: the union of experts a batch routes per step, before any engine runs it.

Per MoE layer and overall: consecutive-token overlap and reuse within 8 tokens (decode tokens), and the
hit rates of token-batched LRU, LFU and Belady at per-layer caches of rho x k slots, the figures of
ROUTING.md's table of trained models. Hit rates count every step, as the engine's GPU hit rate does
(prefetch off); the JSON also has the decode-only ones.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..provenance import run_metadata, write_json
from .replay import admissions, locality, replay_admissions
from .spec import parse_routing, routing_model
from .synthetic import synthetic_trace
from .trace import Trace, load_trace

DEFAULT_RHOS = "0.5,1,1.5,2,3,4,6"
POLICIES = ("lru", "lfu", "belady")


def parse_rhos(text: str) -> list[float]:
    """Cache sizes as positive multiples of k, "0.5,1,2" -> [0.5, 1.0, 2.0]; repeats dropped."""
    rhos = []
    for item in text.split(","):
        try:
            rho = float(item)
        except ValueError:
            rho = math.nan
        if not (math.isfinite(rho) and rho > 0):
            raise InvalidRequestError(
                f"--slots takes positive multiples of k separated by commas (e.g. 0.5,1,2), got {item.strip()!r}",
                "slots",
            )
        rhos.append(rho)
    return list(dict.fromkeys(rhos))


def slots_for(rho: float, k: int) -> int:
    return max(1, round(rho * k))


def routing_report(trace: Trace, rhos: list[float]) -> dict:
    """Locality and hit rates of `trace` as a JSON-ready dict; each distinct slot count is replayed once."""
    steps = admissions(trace)  # shared by every replay
    runs: dict[tuple[int, str], dict] = {}
    cache = []
    for rho in rhos:
        slots = slots_for(rho, trace.top_k)
        for policy in POLICIES:
            if (slots, policy) not in runs:
                result = replay_admissions(steps, dict.fromkeys(trace.layers, slots), policy)
                runs[slots, policy] = result.to_dict()
            cache.append({"rho": rho, "slots": slots, **runs[slots, policy]})
    return {
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": trace.layers,
        "sequences": len(trace.sequences()),
        "rows": len(trace),
        "decode_rows": int((~trace.prefill).sum()),
        "locality": locality(trace).to_dict(),
        "cache": cache,
    }


def _locality_table(report: dict):
    from rich.table import Table

    loc = report["locality"]
    table = Table(
        title="routing locality", caption=f"{loc['tokens']} tokens against their sequence's earlier ones"
    )
    for name in ("layer", "tokens", "overlap", f"reuse ≤{loc['window']}"):
        table.add_column(name, justify="left" if name == "layer" else "right")

    def row(name: str, where: dict) -> list[str]:
        return [name, str(where["tokens"]), _fmt(where["overlap"]), _fmt(where["reuse"])]

    missing = {"tokens": 0, "overlap": None, "reuse": None}  # a layer routed only in prefill
    for layer in report["layers"]:
        table.add_row(*row(str(layer), loc["layers"].get(str(layer), missing)))
    table.add_section()
    table.add_row(*row("overall", loc["overall"]))
    return table


def _hit_rate_table(report: dict):
    """One row per layer, then overall; one column per cache size; each cell LRU, LFU, Belady stacked
    (stacked rather than side by side so seven sizes fit 80 columns)."""
    from rich.table import Table

    table = Table(
        title="hit rate at expert slots per layer (rho x k)",
        caption="token-batched; every step counts, as in the engine's GPU hit rate",
    )
    table.add_column("layer")
    table.add_column("policy")
    sizes = list(dict.fromkeys((c["rho"], c["slots"]) for c in report["cache"]))
    for rho, slots in sizes:
        table.add_column(f"{slots}\n{rho:g}k", justify="right")
    by_size = {(c["rho"], c["policy"]): c for c in report["cache"]}

    def row(name: str, rate) -> list[str]:
        cells = [name, "\n".join(POLICIES)]
        for rho, _ in sizes:
            cells.append("\n".join(_fmt(rate(by_size[rho, p])) for p in POLICIES))
        return cells

    for layer in report["layers"]:
        table.add_row(*row(str(layer), lambda c, key=str(layer): c["layers"][key]["hit_rate"]))
    table.add_section()
    table.add_row(*row("overall", lambda c: c["hit_rate"]))
    return table


def _fmt(value: float | None) -> str:
    """.428 as in ROUTING.md's tables; - where nothing was counted."""
    return "-" if value is None else f"{value:.3f}".removeprefix("0")


def plot_hit_rates(report: dict, path: str | Path, title: str) -> Path:
    """Overall hit rate against slots per layer, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in POLICIES:
        points = sorted({(c["slots"], c["hit_rate"]) for c in report["cache"] if c["policy"] == policy})
        ax.plot([s for s, _ in points], [h for _, h in points], marker="o", label=policy)
    ax.set_xlabel(f"expert slots per layer (k = {report['top_k']}, E = {report['num_experts']})")
    ax.set_ylabel("hit rate (all MoE layers)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    rhos = parse_rhos(args.slots)  # before the trace, so a typo fails at once
    if (args.trace is None) == (args.synthetic is None):
        raise InvalidRequestError("give a trace file or --synthetic ROUTING, not both", "trace")
    if args.synthetic:
        spec = parse_routing(args.synthetic, args.model_type)
        model = routing_model(spec, args.layers, args.experts, args.top_k, args.seed, torch.device("cpu"))
        if model is None:
            raise InvalidRequestError("--synthetic takes uniform, szd or szd:params", "synthetic")
        layers = list(range(args.layers))
        trace = synthetic_trace(model, layers, args.sequences, args.prompt_len, args.gen_len)
        name = f"{args.synthetic} ({args.model_type}), {args.sequences} sequences decoded together"
    else:
        trace, name = load_trace(args.trace), Path(args.trace).name
    if args.as_decode:
        trace = trace.as_decode()
    console = Console()
    # A long trace takes tens of seconds (the engine's own policy classes, in Python).
    with console.status(f"replaying {len(trace):,} rows at {len(rhos)} cache sizes"):
        report = routing_report(trace, rhos)
    title = (
        f"{name}: {report['sequences']} sequences, "
        f"{len(trace.layers)} MoE layers, E {trace.num_experts}, k {trace.top_k}"
    )
    console.print(title, style="bold", soft_wrap=True)
    console.print(_locality_table(report))
    console.print(_hit_rate_table(report))
    if args.png:
        console.print(
            f"saved {plot_hit_rates(report, args.png, title)}", soft_wrap=True
        )  # whole paths, to copy
    if args.json:
        source = (
            {"trace": str(args.trace)}
            if args.trace
            else {"synthetic": args.synthetic, "model_type": args.model_type}
        )
        payload = {**run_metadata(), **source, "as_decode": args.as_decode, **report}
        console.print(f"saved {write_json(args.json, payload)}", soft_wrap=True)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("routing-report")
    p.add_argument("trace", nargs="?", help="routing trace (.npz, .txt or .gz)")
    g = p.add_argument_group("a synthetic trace instead of a file (no model needed)")
    g.add_argument("--synthetic", metavar="ROUTING", help="uniform, szd or szd:params")
    g.add_argument("--model-type", default="qwen3_moe", help="szd's calibration (default qwen3_moe)")
    g.add_argument("--layers", type=int, default=48, help="MoE layers (default 48, Qwen3-30B-A3B)")
    g.add_argument("--experts", type=int, default=128, help="experts a layer (default 128)")
    g.add_argument("--top-k", type=int, default=8, help="experts a token (default 8)")
    g.add_argument("--sequences", type=int, default=1, help="documents decoded as one batch (default 1)")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--gen-len", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slots",
        default=DEFAULT_RHOS,
        help=f"cache sizes per layer as multiples of k, comma-separated (default {DEFAULT_RHOS})",
    )
    p.add_argument(
        "--as-decode",
        action="store_true",
        help="every token its own decode step: for traces of teacher-forced text (tiermoe eval's windows "
        "are prefills, each routed token by token as decode would)",
    )
    p.add_argument("--png", default=None, help="write the hit rate plot here")
    p.add_argument("--json", default=None, help="write every figure here")
    p.set_defaults(func=main)
    return p
