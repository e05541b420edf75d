"""The `tiermoe` command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import sys

from .errors import TiermoeError


def add_engine_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    """The engine flags; model=False leaves --model to the caller (chat pairs it with --url)."""
    if model:
        p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    p.add_argument(
        "--gpu-budget", type=float, default=None, help="GiB for everything on the GPU (default: free - 1)"
    )
    p.add_argument(
        "--cpu-budget", type=float, default=None, help="GiB of pinned RAM for experts (default: RAM/2)"
    )
    p.add_argument("--eviction", default="lfu", help="GPU expert slot policy: lfu, lru, lru-protect")
    p.add_argument(
        "--prefetch", action="store_true", help="predict the next layer's experts and copy them ahead of use"
    )
    p.add_argument(
        "--routing",
        default=None,
        help="who picks the experts: natural (the routers), uniform, szd, szd:s_g=..,sigma_doc=..,sigma_loc=..,"
        "phi=..,p_stick=.. or trace:FILE (default: szd on synthetic checkpoints, natural otherwise)",
    )
    p.add_argument("--routing-seed", type=int, default=0, help="seed of emulated routing")
    p.add_argument(
        "--record-routing",
        default=None,
        metavar="FILE",
        help="write every token's expert ids to FILE (.npz or .txt.gz)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_budget_gib=args.gpu_budget,
        cpu_budget_gib=args.cpu_budget,
        eviction=args.eviction,
        prefetch=args.prefetch,
        routing=args.routing,
        routing_seed=args.routing_seed,
        record_routing=args.record_routing,
        show_progress=True,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="run to --max-tokens even past end-of-sequence")


def sampling_params(args: argparse.Namespace):
    from .engine.request import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def build_parser() -> argparse.ArgumentParser:
    from . import chat, generate, hardware
    from .bench import run as bench_run
    from .bench import synth
    from .routing import report as routing_report

    parser = argparse.ArgumentParser(prog="tiermoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    try:
        from .server import serve

        serve.add_parser(sub)
    except ImportError as e:  # the server's packages are an optional extra
        missing = e.name
        p = sub.add_parser("serve", help="OpenAI-compatible server (needs: pip install 'tiermoe[serve]')")
        # Whatever flags were given, the answer is what to install.
        p.set_defaults(func=lambda _: _missing_extra("serve", missing), accepts_unknown=True)
    for module in (chat, synth, bench_run, hardware, routing_report):
        module.add_parser(sub)
    return parser


def _missing_extra(extra: str, package: str | None) -> int:
    raise TiermoeError(f"tiermoe {extra} needs the package {package}: pip install 'tiermoe[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args) or 0
    except TiermoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
