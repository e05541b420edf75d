"""Loading a model for a command: the engine flags `serve` and `chat` share, and the load with progress."""

from __future__ import annotations

import argparse
import time

from rich.console import Console


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, help="compute dtype, e.g. bfloat16 (default: the checkpoint's)"
    )
    parser.add_argument(
        "--gpu-budget-gib", type=float, default=None, help="GPU memory for experts, GiB (default: measured)"
    )
    parser.add_argument(
        "--cpu-budget-gib",
        type=float,
        default=None,
        help="pinned host memory for experts, GiB (default: measured)",
    )


def load_llm(model_dir: str, args: argparse.Namespace, console: Console):
    """LLM(model_dir) with the engine flags, showing a spinner with elapsed time while weights load."""
    from .api import LLM  # torch is heavy: import it only for commands that load a model

    start = time.perf_counter()
    with console.status(f"Loading {model_dir} ...", spinner="dots"):
        llm = LLM(
            model_dir,
            device=args.device,
            dtype=args.dtype,
            gpu_budget_gib=args.gpu_budget_gib,
            cpu_budget_gib=args.cpu_budget_gib,
        )
    console.print(f"Loaded {llm.model_name} in {time.perf_counter() - start:.1f} s")
    return llm
