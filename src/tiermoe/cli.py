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
    p.add_argument(
        "--kv-reserve-tokens",
        type=int,
        default=None,
        help="KV cache tokens reserved in the GPU budget, shared by a batch's rows (default: context, at most 4096)",
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
        kv_reserve_tokens=args.kv_reserve_tokens,
        eviction=args.eviction,
        prefetch=args.prefetch,
        routing=args.routing,
        routing_seed=args.routing_seed,
        record_routing=args.record_routing,
        show_progress=True,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # None everywhere: the engine resolves it (request.SamplingParams), so there is one default per setting.
    p.add_argument("--max-tokens", type=int, default=None, help="default: to the end of the context")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy (default: generation_config.json's, else 0)",
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="0 = off (default: generation_config.json's, else 0)"
    )
    p.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's, else 1")
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="default: generation_config.json's, else 1"
    )
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


# Every subcommand: the module that registers it (imported only when that command runs, so `tiermoe
# --help` and `tiermoe chat --url` never import torch) and its one-line help.
COMMANDS = {
    "generate": ("generate", "generate text from a prompt, streaming"),
    "demo": ("generate", "write a small random-weight Qwen3-MoE checkpoint and generate from it"),
    "serve": ("server.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "chat": ("chat", "chat in the terminal"),
    "synth": ("bench.synth", "write a random-weight checkpoint with a real model's config"),
    "bench": ("bench.run", "time tiermoe and its peers; JSON and PNG under bench/results/"),
    "profile": ("hardware", "measure PCIe, disk, CPU and GPU ceilings and the decode floor"),
    "routing-report": (
        "routing.report",
        "locality and offline LRU / LFU / Belady hit rates of a routing trace",
    ),
}


class _Subcommands:
    """The subparsers as modules see them: each parser gets its one-line help from COMMANDS."""

    def __init__(self, sub):
        self.sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, help=COMMANDS[name][1], **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s module loaded (every other command listed by name and help only)."""
    import importlib

    parser = argparse.ArgumentParser(prog="tiermoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if command in COMMANDS:
        module = COMMANDS[command][0]
        try:
            importlib.import_module(f"{__package__}.{module}").add_parser(_Subcommands(sub))
        except ImportError as e:
            if module != "server.serve":
                raise
            # The server's packages are an optional extra: whatever flags were given, say what to install.
            p = sub.add_parser("serve", help=COMMANDS["serve"][1])
            p.set_defaults(
                func=lambda _, missing=e.name: _missing_extra("serve", missing), accepts_unknown=True
            )
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _missing_extra(extra: str, package: str | None) -> int:
    raise TiermoeError(f"tiermoe {extra} needs the package {package}: pip install 'tiermoe[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
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
