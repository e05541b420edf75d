"""`tiermoe bench`: tiermoe and its HF peers on one checkpoint, the same prompts and the same GPU caps.

Every setting is measured in its own process (measure.py). The result file holds one run object per
engine and setting (keys in report.RUN_KEYS), each with the provenance of the whole bench, and a PNG
of decode tok/s next to it. Capped tiermoe runs get two floors, both from the engine's own memory plan:
`pcie_floor_tok_s`, how fast any engine could decode if every expert the budget cannot hold crossed
PCIe each time uniform routing used it, and `floor_tok_s`, the floor at the run's own measured hit rate
(its decode H2D bytes at the measured PCIe bandwidth, against the uncapped run's all-resident step).
A capped run's prefill gets `prefill_floor_fraction`: its expert bytes at that bandwidth over its TTFT.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .. import planning
from ..config import MISS_PATHS, EngineConfig
from ..errors import BudgetError, InvalidRequestError
from ..formats.dense import DenseFormat
from ..formats.registry import format_for
from ..hardware import decode_floor, h2d_bandwidth, measured_floor, missed_expert_bytes_per_token
from ..models.registry import from_config
from ..offload.placement import DEFAULT_KV_TOKENS, plan_from_config
from ..offload.policy import POLICIES
from ..provenance import RESULTS_DIR, run_metadata, timestamp, write_json
from ..routing.spec import parse_routing
from . import llamacpp, peers
from .measure import run_isolated
from .report import RUN_KEYS, plot_runs, variant_name
from .shapes import bytes_per_element
from .synth import read_synth_info
from .workload import Workload

MISS_FLAGS = ("copy", "in-place", "staged", "cpu")  # a variant's miss path flags (cpu: copy with CPU compute)
STORE_OPTIONS = ("eviction", "prefetch", "miss_path", "cpu_compute")  # a variant's settings, kept in its run

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
    known = (*peers.PEERS, llamacpp.ENGINE)
    unknown = [p for p in names if p not in known]
    if unknown:
        raise InvalidRequestError(
            f"unknown peer(s) {', '.join(unknown)}; peers are: {', '.join(known)}", param="peers"
        )
    return names


H2D_PASSES = 3  # the best of three 4 GiB passes: one short pass right after the engines read 12-26 GB/s
# on the H100 where tiermoe profile reads 50-54 and the runs themselves had moved 25-40 (2026-12-07)


def measure_h2d(config: dict) -> float | None:
    """Pinned host-to-device GB/s in chunks of one expert, the transfer the offload path makes."""
    if not torch.cuda.is_available():
        return None
    chunk = from_config(config)[2].expert_numel() * bytes_per_element(config)
    return max(h2d_bandwidth(chunk, pinned=True) for _ in range(H2D_PASSES))


def link_ceiling(measured: float | None, runs: list[dict]) -> tuple[float | None, str]:
    """The H2D ceiling the floors use, and where it comes from: the measurement, or the best a run
    achieved where that is higher (a ceiling below what was moved is a bad measurement)."""
    achieved = max((r.get("h2d_gb_s") or 0.0 for r in runs if r["engine"] == "tiermoe"), default=0.0)
    if measured is not None and achieved > measured:
        return achieved, f"a run's achieved {achieved:.1f} GB/s (the measurement read {measured:.1f})"
    return measured, "measured"


def pcie_floor(config: dict, engine: EngineConfig, batch: int, h2d_gb_s: float | None) -> float | None:
    """Best decode tok/s (whole batch) if every expert use the engine's GPU slots cannot serve crosses
    PCIe, under uniform routing; engine: the budgets, device and dtype the tiermoe run was given."""
    if engine.gpu_budget_gib is None or not h2d_gb_s:
        return None
    try:
        plan = plan_from_config(config, engine)
    except BudgetError:
        return None  # the engine refuses this budget too; its run records why
    missed = missed_expert_bytes_per_token(plan, int(config["num_experts_per_tok"]), batch)
    return decode_floor(missed, h2d_gb_s, None).pcie_tok_s


def run_floors(run: dict, h2d_gb_s: float | None, resident_tok_s: float | None) -> dict:
    """floor_tok_s, floor_serial_tok_s, floor_note and floor_fraction of a capped tiermoe run, from its
    decode H2D bytes per token, the measured PCIe bandwidth and the decode tok/s of the uncapped run of
    the same routing (its all-resident step time). All None for a run that did not decode."""
    if not run.get("decode_tok_s"):
        return {"floor_tok_s": None, "floor_serial_tok_s": None, "floor_note": None, "floor_fraction": None}
    floor = measured_floor(
        run.get("h2d_bytes_per_token"), h2d_gb_s, 1 / resident_tok_s if resident_tok_s else None
    )
    fraction = run["decode_tok_s"] / floor.floor_tok_s if floor.floor_tok_s else None
    return {**vars(floor), "floor_fraction": fraction}


def prefill_floor_fraction(run: dict, h2d_gb_s: float | None) -> float | None:
    """How close a capped run's prefill came to moving its experts at the measured PCIe bandwidth: the
    time those bytes take at that bandwidth over the time to first token (1: PCIe-bound and nothing
    else). None without prefill bytes, bandwidth or TTFT."""
    moved, ttft = run.get("prefill_h2d_bytes"), run.get("ttft_s")
    if not (moved and h2d_gb_s and ttft):
        return None
    return moved / (h2d_gb_s * 1e9) / ttft


def parse_routings(value: str | None) -> list[str | None]:
    """`--routing natural,uniform,szd:s_g=0.4,phi=0.9` -> ["natural", "uniform", "szd:s_g=0.4,phi=0.9"]:
    an item NAME=VALUE continues the szd item before it. None: [None], the engine's default (szd on
    synthetic checkpoints). Each is checked now, so a typo is one error line before anything runs."""
    if not value:
        return [None]
    items: list[str] = []
    for item in (i.strip() for i in value.split(",")):
        if "=" in item and ":" not in item and items and items[-1].startswith("szd"):
            items[-1] += "," + item
        elif item:
            items.append(item)
    for item in items:
        spec = parse_routing(item)
        if spec.mode == "trace" and not Path(spec.trace_path).is_file():
            raise InvalidRequestError(f"--routing {item}: no such trace file", param="routing")
    return items


def routing_trace_path(base: str, routing: str | None, budget: float | None, variant: str = "") -> str:
    """--record-routing PATH -> PATH's stem + -<routing>-<budget>[-<variant>] + its suffix, so runs do
    not overwrite each other's traces (routing: the spec as given, made file-name safe)."""
    path = Path(base)
    suffix = ".txt.gz" if path.name.endswith(".txt.gz") else path.suffix
    stem = path.name.removesuffix(suffix)
    mode, _, rest = (routing or "default").partition(":")
    name = f"{mode}_{Path(rest).stem}" if mode == "trace" else (routing or "default")
    parts = [name, "uncapped" if budget is None else f"{budget:g}gib", variant]
    slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", p).strip("_") for p in parts if p)
    return str(path.with_name(f"{stem}-{slug}{suffix}"))


# Peers route with the checkpoint's own routers, and their speed does not depend on where experts go.
PEER_ROUTING_NOTES = {
    "hf": "HF keeps every expert on the GPU: no expert moves whatever the routing",
    "hf-offload": "HF offload moves every offloaded layer every token whatever the routing",
    "llama.cpp": "llama.cpp computes CPU experts whatever the routing",
}


def parse_variants(value: str | None) -> list[dict]:
    """`lru,lfu,lru-protect,lru+noprefetch,lfu+noprefetch+in-place,lfu+staged,lfu+copy,lfu+cpu` -> tiermoe
    options per variant (eviction policy, prefetch, miss path, CPU compute of misses); None: the engine's
    defaults. Without a miss path flag the engine's default (auto) decides; the run records the one that ran."""
    defaults = EngineConfig()
    if not value:
        return [
            {
                "eviction": defaults.eviction,
                "prefetch": defaults.prefetch,
                "miss_path": defaults.miss_path,
                "cpu_compute": defaults.cpu_compute,
            }
        ]
    variants = []
    for item in value.split(","):
        policy, *flags = item.strip().split("+")
        if (
            policy not in POLICIES
            or not set(flags) <= {"noprefetch", *MISS_FLAGS}
            or len(set(flags)) < len(flags)
            or len(set(flags) & set(MISS_FLAGS)) > 1
        ):
            raise InvalidRequestError(
                f"--variants items are POLICY[+noprefetch][+copy|+in-place|+staged|+cpu] with POLICY one of "
                f"{', '.join(POLICIES)}; "
                f"got {item!r}",
                param="variants",
            )
        variants.append({
            "eviction": policy,
            "prefetch": "noprefetch" not in flags,
            "miss_path": next((f for f in flags if f in MISS_PATHS), defaults.miss_path),
            "cpu_compute": "cpu" in flags,
        })  # fmt: skip
    return variants


def kv_reserve_for(config: dict, workload: Workload) -> int:
    """The KV reserve of a tiermoe run: the engine's default (the context, at most DEFAULT_KV_TOKENS), or
    the workload's batch x (prompt + generated) tokens where that is larger, so a batched run fits."""
    default = min(config.get("max_position_embeddings") or DEFAULT_KV_TOKENS, DEFAULT_KV_TOKENS)
    return max(default, workload.batch * (workload.prompt_len + workload.gen_len))


def _settings(
    budgets: list[float | None],
    peer_names: list[str],
    variants: list[dict],
    routings: list[str | None] = (None,),
) -> list[tuple[str, float | None, dict | None]]:
    """tiermoe at every budget and routing, a budget's routings side by side (every variant when capped:
    they only differ when experts move; routing None: the engine's default); hf once, uncapped (it
    cannot be capped); hf-offload at every cap."""
    settings = [
        ("tiermoe", b, {**v, **({"routing": r} if r else {})})
        for b in budgets
        for r in routings
        for v in (variants if b is not None else variants[:1])
    ]
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
    routings: list[str | None] | None = None,
    record_routing: str | None = None,
    llama_cpp: llamacpp.LlamaCppOptions | None = None,
    measured: Callable[[list[dict]], None] | None = None,
    kv_reserve_tokens: int | None = None,
    also_models: list[str | Path] = (),
    workspace_gib: float | None = None,
    sweep: dict | None = None,
) -> dict:
    """Measure every setting and return {"runs": [...], ...}; writes nothing but the routing traces
    asked for (record_routing: a path each tiermoe run's trace is named after). `measured` is given the
    runs so far after each setting, so that a bench stopped from outside keeps what it measured.
    kv_reserve_tokens: every tiermoe run's KV reserve (default: kv_reserve_for the workload).
    workspace_gib: every tiermoe run's workspace reserve (default: the engine's).
    also_models: checkpoints of the same shape (e.g. its bf16 original beside a quantized model) that
    tiermoe runs at the same settings, in the same results; the peers run once, on model_dir.
    sweep: a concurrency sweep's shared state, {"batches": [...]} (main makes it): each tiermoe setting
    is loaded once for all of them, its figures at the other batches kept here for their bench calls."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    extra = [(Path(m), _read_config(Path(m))) for m in also_models]
    if llamacpp.ENGINE in peer_names and llama_cpp is None:
        raise InvalidRequestError(
            "--peers llama.cpp needs --llama-cpp DIR, a llama.cpp build and its converter (bench/README.md)",
            param="llama_cpp",
        )
    # The engine settings every tiermoe run shares besides its budget, routing and policy; a bad device,
    # dtype or budget fails here, before any run, as it would in every tiermoe run.
    engine_config = {
        "device": device,
        "dtype": dtype,
        "cpu_budget_gib": cpu_budget_gib,
        "kv_reserve_tokens": kv_reserve_tokens or kv_reserve_for(config, workload),
        "workspace_gib": workspace_gib,
    }
    EngineConfig(**engine_config)
    workspace = {"workspace_gib": workspace_gib} if workspace_gib is not None else {}
    metadata = run_metadata(argv)

    def common_of(mdir: Path, cfg: dict) -> dict:
        info = read_synth_info(mdir)
        experts_format = format_for(cfg, *from_config(cfg)[2].expert_shape, torch.bfloat16)
        dense = info.get("dtype") or _DTYPE_NAMES.get(cfg.get("torch_dtype", ""), cfg.get("torch_dtype"))
        return {
            "model_preset": info.get("preset", mdir.name),
            "model_dir": str(mdir),
            "experts_dtype": dense if isinstance(experts_format, DenseFormat) else experts_format.name,
            "cpu_budget_gib": cpu_budget_gib,
            "batch": workload.batch,
            "prompt_len": workload.prompt_len,
            **metadata,
        }

    common = common_of(model_dir, config)
    peer_workload = Workload(
        workload.prompt_len,
        peer_gen_len or workload.gen_len,
        workload.batch,
        peer_repeat or workload.repeat,
        workload.seed,
    )
    results = []
    variants = variants or parse_variants(None)
    settings = [
        (model_dir, common, *s) for s in _settings(gpu_budgets, peer_names, variants, routings or [None])
    ]
    for mdir, cfg in extra:  # tiermoe alone, at the same settings
        settings += [
            (mdir, common_of(mdir, cfg), *s) for s in _settings(gpu_budgets, [], variants, routings or [None])
        ]
    for mdir, model_common, engine, budget, options in settings:
        w = workload if engine == "tiermoe" else peer_workload
        budget_text = "uncapped" if budget is None else f"{budget:g} GiB"
        variant = (
            ""
            if options is None
            else f" ({options.get('routing') or 'default'} routing, {options['eviction']}, "
            f"prefetch {'on' if options['prefetch'] else 'off'}{', CPU compute' if options.get('cpu_compute') else ''})"
        )
        trace = None
        if engine == "tiermoe" and record_routing:
            several = budget is not None and len(variants) > 1  # name the variant only where it differs
            trace = routing_trace_path(
                record_routing,
                options.get("routing"),
                budget,
                variant_name({**options, "gpu_budget_gib": budget}) if several else "",
            )
            options = {**options, "record_routing": trace}
        progress(
            f"bench: {engine}{variant} at GPU {budget_text}, batch {w.batch}, {w.prompt_len}+{w.gen_len} tokens, {w.repeat} runs"
        )

        def measure(
            batches: list[int] | None = None, engine=engine, mdir=mdir, w=w, budget=budget, options=options
        ):
            return run_isolated(
                engine,
                mdir,
                w,
                budget,
                cpu_budget_gib,
                timeout_s * len(batches or [w.batch]),  # a sweep's limit: timeout_s a batch
                device if engine == "tiermoe" else None,
                dtype if engine == "tiermoe" else None,
                {**options, "kv_reserve_tokens": engine_config["kv_reserve_tokens"], **workspace}
                if engine == "tiermoe"
                else options,
                batches,
            )

        if engine == "tiermoe" and sweep is not None:  # (main makes none where routing is recorded)
            figures = _swept(
                sweep, (str(mdir), budget, json.dumps(options, sort_keys=True)), w.batch, measure
            )
        else:
            figures = measure()
        if figures.get("error"):
            progress(f"bench: {engine}: {figures['error']}")
        run = {
            **model_common,
            "engine": engine,
            "gpu_budget_gib": budget,
            **{k: v for k, v in (options or {}).items() if k in STORE_OPTIONS},
            **({"plan": "manual"} if engine == "tiermoe" else {}),
            **(
                {"kv_reserve_tokens": engine_config["kv_reserve_tokens"], **workspace}
                if engine == "tiermoe"
                else {}
            ),
            "gen_len": w.gen_len,
            "repeat": w.repeat,
            **figures,
        }
        if engine == "tiermoe":
            # The child reads the routing in force back from the LLM; a run that failed keeps what was asked.
            requested = options.get("routing")
            run.setdefault("routing", parse_routing(requested).mode if requested else None)
            run["routing_trace"] = trace if trace and Path(trace).exists() else None
        if w.gen_len != workload.gen_len:
            run["gen_len_requested"] = workload.gen_len  # peers' length was capped with --peer-gen-len
        results.append(run)
        if measured:
            measured(results)
    if llamacpp.ENGINE in peer_names:
        # The fitted split once per capped budget; all on the GPU and all experts on the CPU once each.
        llama_runs = llamacpp.runs(model_dir, workload, gpu_budgets, llama_cpp, timeout_s, progress)
        results += [{**common, **r} for r in llama_runs]
        if measured:
            measured(results)

    # Measured last, so this process holds no CUDA context while the engines run.
    h2d, source = (h2d_gb_s, "given") if h2d_gb_s is not None else link_ceiling(measure_h2d(config), results)
    for mdir, cfg in [(model_dir, config), *extra]:  # each model's floors from its own plan
        group = [r for r in results if r["model_dir"] == str(mdir)]  # the peers are model_dir's
        _finish_runs(group, cfg, workload.batch, h2d, engine_config)
    return {
        "runs": results,
        "model_dir": str(model_dir),
        "h2d_gb_s": h2d,
        "h2d_source": source,
        "seed": workload.seed,
    }


def _swept(sweep: dict, key: tuple, batch: int, measure: Callable[..., dict]) -> dict:
    """This batch's figures of a tiermoe setting in a concurrency sweep: its first bench call measures every
    batch on one load (a time limit per batch), the later ones take theirs from `sweep`."""
    if key not in sweep:
        batches = sweep["batches"]
        result = measure(batches=batches)
        figures = result.get("sweep") or []  # none: the load failed
        # A child stopped mid-sweep (timed out, killed) leaves its error to the batches it never ran.
        missing = [{"error": result["error"]}] * (len(batches) - len(figures))
        sweep[key] = dict(zip(batches, figures + missing, strict=True))
    return sweep[key][batch]


def _read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise InvalidRequestError(
            f"{model_dir} has no config.json; write one with `tiermoe synth`", param="model"
        )
    return json.loads(config_path.read_text())


def _routing_key(run: dict) -> tuple:
    return run.get("routing"), json.dumps(run.get("routing_params"), sort_keys=True)


def _finish_runs(runs: list[dict], config: dict, batch: int, h2d_gb_s: float | None, engine: dict) -> None:
    """Floors of every capped tiermoe run, routing notes of the peers, and every RUN_KEYS key present.
    engine: the EngineConfig fields every tiermoe run was given besides its GPU budget."""
    # The all-resident step: an uncapped run that moved no experts (the engine's default budget may not
    # hold every expert on a small GPU, and then its speed is no such step).
    uncapped = {
        _routing_key(r): r["decode_tok_s"]
        for r in runs
        if r["engine"] == "tiermoe"
        and r["gpu_budget_gib"] is None
        and r.get("decode_tok_s")
        and not r.get("h2d_bytes_per_token")
    }
    for run in runs:
        if run["engine"] == "tiermoe" and run["gpu_budget_gib"] is not None:
            capped = EngineConfig(gpu_budget_gib=run["gpu_budget_gib"], **engine)
            run["pcie_floor_tok_s"] = pcie_floor(config, capped, batch, h2d_gb_s)
            run.update(run_floors(run, h2d_gb_s, uncapped.get(_routing_key(run))))
            run["prefill_floor_fraction"] = prefill_floor_fraction(run, h2d_gb_s)
            if run.get("model_dir"):  # beside measured, where a saved plan predicts this layout
                run["predicted_tok_s"] = planning.predicted(run["model_dir"], run)
        elif run["engine"] != "tiermoe":
            run["routing"] = None
            run.setdefault("routing_note", PEER_ROUTING_NOTES.get(run["engine"]))
        for key in RUN_KEYS:
            run.setdefault(key, None)


def _summary_table(runs: list[dict]):
    from rich.table import Table

    table = Table(title="tiermoe bench")
    for col in (
        "engine",
        "experts",
        "GPU cap",
        "routing",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "TTFT s",
        "peak GPU GiB",
        "GPU hit rate",
        "H2D GB/s",
        "floor tok/s",
        "of floor",
        "PCIe floor (uniform)",
        "note",
    ):
        table.add_column(col)

    def fmt(v, spec=",.2f"):
        return "-" if v is None else format(v, spec)

    for r in runs:
        cap = "none" if r["gpu_budget_gib"] is None else f"{r['gpu_budget_gib']:g}"
        table.add_row(
            f"{r['engine']} {variant_name(r)}".strip(), r["experts_dtype"] or "-", cap, r["routing"] or "-", str(r["batch"]),
            fmt(r["prefill_tok_s"], ",.1f"), fmt(r["decode_tok_s"]), fmt(r["ttft_s"], ".3f"), fmt(r["peak_gpu_gib"]),
            fmt(r["gpu_hit_rate"], ".1%"), fmt(r["h2d_gb_s"], ".1f"), fmt(r["floor_tok_s"]),
            fmt(r["floor_fraction"], ".0%"), fmt(r["pcie_floor_tok_s"]), _note(r),
        )  # fmt: skip
    return table


def _note(run: dict) -> str:
    """A run's error, else a capped tiermoe run's GPU slots a layer (fewer than top-k: waves a layer)."""
    if run["error"]:
        return run["error"][:60]
    slots = (run.get("experts") or {}).get("layer_slots_min")
    return "" if slots is None else f"fewest slots a layer: {slots}"


def _batches(value: str) -> str:
    if not all(b.strip().isdigit() and int(b) >= 1 for b in value.split(",")):
        raise argparse.ArgumentTypeError(
            f"--batch takes counts of sequences >= 1, comma-separated; got {value!r}"
        )
    return value


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs keep the table's columns whole
    batches = [int(b) for b in str(args.batch).split(",")]
    preset = read_synth_info(Path(args.model)).get("preset", Path(args.model).name)
    stem = args.name or f"bench-{preset}-b{'-'.join(map(str, batches))}-{timestamp()}"
    out_dir = Path(args.out_dir)
    # The runs so far, rewritten after each setting and removed once the whole result is written.
    partial = out_dir / f"{stem}.partial.json"
    # Each number of concurrent sequences runs every setting; one results file holds them all.
    payload, done = {}, []
    workloads = [Workload(args.prompt_len, args.gen_len, b, args.repeat, args.seed) for b in batches]
    # A sweep loads each tiermoe setting once, with the KV reserve of its largest batch: the layout a
    # server with that many sequences has, at every batch of the sweep.
    sweep = {"batches": batches} if len(batches) > 1 and not args.record_routing else None
    if sweep and args.kv_reserve_tokens is None:
        config = _read_config(Path(args.model))
        args.kv_reserve_tokens = max(kv_reserve_for(config, w) for w in workloads)
    for workload in workloads:
        payload = _bench_one(
            args,
            workload,
            console,
            lambda runs, before=list(done): write_json(partial, {"runs": before + runs, "partial": True}),
            sweep,
        )
        done += payload["runs"]
    payload["runs"] = runs = done
    json_path = write_json(out_dir / f"{stem}.json", payload)
    partial.unlink(missing_ok=True)
    title = f"{runs[0]['model_preset']} ({runs[0]['experts_dtype']}), batch {args.batch}, {runs[0]['device']}"
    png_path = plot_runs(runs, out_dir / f"{stem}.png", title)
    console.print(_summary_table(runs))
    for r in runs:
        if r["experts"]:
            cap = "uncapped" if r["gpu_budget_gib"] is None else f"{r['gpu_budget_gib']:g} GiB"
            console.print(
                f"expert store, {r['engine']} at {cap}, {r['routing']} routing: {json.dumps(r['experts'])}"
            )
    console.print(f"saved {json_path} and {png_path}")
    return 0


def _bench_one(args: argparse.Namespace, workload: Workload, console, measured, sweep: dict | None) -> dict:
    return bench(
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
        routings=parse_routings(args.routing),
        also_models=args.also_model or [],
        record_routing=args.record_routing,
        llama_cpp=llamacpp.options(args.llama_cpp, args.llama_cpp_formats, args.llama_cpp_source),
        measured=measured,
        kv_reserve_tokens=args.kv_reserve_tokens,
        workspace_gib=args.workspace,
        sweep=sweep,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench")
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. from `tiermoe synth`)")
    p.add_argument(
        "--gpu-budget", action="append", help="GiB, comma-separated or repeated; 'none' = uncapped"
    )
    p.add_argument("--cpu-budget", type=float, default=None, help="pinned host cache, GiB")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument(
        "--batch",
        default="1",
        type=_batches,
        help="concurrent sequences; a comma-separated list (1,4,16,64) runs every setting at each",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up; figures are medians")
    p.add_argument(
        "--also-model",
        action="append",
        metavar="DIR",
        help="another checkpoint of the same shape tiermoe runs at the same settings, in the same results "
        "(e.g. the bf16 original of a quantized --model); repeatable",
    )
    p.add_argument("--peers", default="", help="comma-separated: hf, hf-offload, llama.cpp")
    p.add_argument(
        "--llama-cpp", default=None, metavar="DIR", help="llama.cpp build and converter (--peers llama.cpp)"
    )
    p.add_argument(
        "--llama-cpp-source",
        default=None,
        metavar="DIR",
        help="the checkpoint llama.cpp converts (default: --model), e.g. the bf16 one a quantized --model came from",
    )
    p.add_argument(
        "--llama-cpp-formats",
        default=None,
        help=f"GGUFs llama.cpp runs, comma-separated: {', '.join(llamacpp.FORMATS)} (default: base, the "
        "converter's bf16, or q8_0 for experts generated in memory)",
    )
    p.add_argument(
        "--peer-gen-len", type=int, default=None, help="shorter generation for slow peers (recorded)"
    )
    p.add_argument("--peer-repeat", type=int, default=None, help="timed runs for peers (default: --repeat)")
    p.add_argument(
        "--variants",
        default=None,
        help="tiermoe settings to compare when capped: POLICY[+noprefetch][+in-place|+staged|+cpu], comma-separated "
        "(e.g. lru,lfu,lru-protect,lru+noprefetch,lfu+noprefetch+in-place,lfu+staged,lfu+noprefetch+cpu; default: the "
        "engine's own, lfu without prefetch, misses copied, none computed on the CPU)",
    )
    p.add_argument(
        "--routing",
        default=None,
        help="tiermoe runs once per routing at every budget, comma-separated: natural, uniform, szd, "
        "szd:NAME=VALUE,..., trace:FILE (default: the engine's, szd on synthetic checkpoints)",
    )
    p.add_argument(
        "--record-routing",
        default=None,
        metavar="PATH",
        help="record each tiermoe run's routing to PATH's stem + -<routing>-<budget> + its suffix",
    )
    p.add_argument(
        "--kv-reserve-tokens",
        type=int,
        default=None,
        help="tiermoe's KV cache reserve, tokens (default: the engine's, or batch x (prompt + gen) if larger)",
    )
    p.add_argument(
        "--workspace",
        type=float,
        default=None,
        help="tiermoe's GiB for activations and library workspace (default: the engine's, 1 on cuda)",
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
