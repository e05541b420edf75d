"""`tiermoe plan`: every candidate layout of a model at these budgets, measured costs and the engine
calibrated on the model (planning.py), printed as a table; the pick saved for `--preset`."""

from __future__ import annotations

import argparse
import json

from .config import EngineConfig
from .planning import make_plan, pick, plan_path, verify


def main(args: argparse.Namespace) -> int:
    from .flags import engine_kwargs  # here: flags imports planning, which must not import it back

    kwargs = {k: v for k, v in engine_kwargs(args).items() if k != "show_progress"}
    plan = make_plan(args.model, kwargs, args.preset)
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
    picked = pick(plan, "latency" if args.preset == "auto" else args.preset)
    print(
        f"chosen ({args.preset}): {picked['layout']}, predicted {picked['predicted_tok_s']:.1f} tok/s; saved {path}"
    )
    if args.verify:
        verify(args.model, kwargs, plan)
    return 0


def add_parser(sub) -> None:
    from .flags import add_engine_args

    p = sub.add_parser("plan")
    add_engine_args(p)
    p.add_argument(
        "--verify", action="store_true", help="measure every candidate too (bench/results/plan-*.json)"
    )
    p.set_defaults(func=main, preset="latency")
