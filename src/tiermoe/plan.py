"""`tiermoe plan`: every candidate layout of a model at these budgets, measured costs and the engine
calibrated on the model (planning.py), printed as a table; the pick saved for `--preset`. `--verify` also
measures every candidate (bench/measure.py, one child process each) and writes predicted beside measured
to bench/results/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import EngineConfig
from .planner import Layout
from .planning import CALIBRATION_PROMPT, CALIBRATION_TOKENS, concrete, make_plan, pick, plan_path


def main(args: argparse.Namespace) -> int:
    from .flags import engine_kwargs  # here: flags imports planning, which must not import it back

    kwargs = {k: v for k, v in engine_kwargs(args).items() if k != "show_progress"}
    preset = concrete(args.preset, "plan")
    plan = make_plan(args.model, kwargs, preset, calibrated=args.calibrate)
    config = EngineConfig(**kwargs)
    path = plan_path(args.model, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1))
    print(
        f"{'layout':32s} {'slots':>6s} {'hit':>6s} {'stream':>7s} {'CPU':>6s} {'in place':>8s} {'tok/s':>7s}"
    )
    for c in plan["candidates"]:
        print(
            f"{c['layout']:32s} {c['slots_per_layer']:6.1f} {c['gpu_hit_rate'] or 0:6.3f} "
            f"{c['streamed_per_token']:7.1f} {c['cpu_per_token']:6.1f} {c['in_place_per_token']:8.1f} "
            f"{c['predicted_tok_s']:7.1f}"
        )
    picked = pick(plan, preset)
    print(
        f"chosen ({preset}): {picked['layout']}, predicted {picked['predicted_tok_s']:.1f} tok/s; saved {path}"
    )
    if args.verify:
        verify(args.model, kwargs, plan)
    return 0


def verify(model_dir: str | Path, kwargs: dict, plan: dict) -> Path:
    """Measure every candidate as the bench does (a child process each) and write predicted beside
    measured."""
    from .bench.measure import run_isolated
    from .bench.workload import Workload
    from .provenance import RESULTS_DIR, run_metadata, timestamp, write_json

    work = Workload(CALIBRATION_PROMPT, CALIBRATION_TOKENS, repeat=2)
    budgets = {k: kwargs.get(k) for k in ("gpu_budget_gib", "cpu_budget_gib")}
    rows = []
    for c in plan["candidates"]:
        options = Layout.options_of(c)
        figures = run_isolated(
            "tiermoe", model_dir, work, budgets["gpu_budget_gib"], budgets["cpu_budget_gib"],
            options={**options, **{k: v for k, v in kwargs.items() if k in ("routing", "dtype")}},
        )  # fmt: skip
        measured = figures.get("decode_tok_s")
        rows.append({**c, "measured_tok_s": measured, "measured_gpu_hit_rate": figures.get("gpu_hit_rate"),
                     "error": figures.get("error")})  # fmt: skip
        print(f"verify: {c['layout']}: predicted {c['predicted_tok_s']:.1f}, measured {measured}")
    out = Path(RESULTS_DIR) / f"plan-{Path(model_dir).name}-{timestamp()}.json"
    write_json(
        out, {**run_metadata(), **{k: v for k, v in plan.items() if k != "candidates"}, "candidates": rows}
    )
    return out


def add_parser(sub) -> None:
    from .flags import add_engine_args

    p = sub.add_parser("plan")
    add_engine_args(p)
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the step time on a short decode of the model (default); --no-calibrate plans without "
        "loading it, from an szd trace and an estimated step: the order of the candidates, not their tok/s",
    )
    p.add_argument(
        "--verify", action="store_true", help="measure every candidate too (bench/results/plan-*.json)"
    )
    p.set_defaults(func=main, preset="latency")
