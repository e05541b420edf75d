"""The `tiermoe` command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import sys

from .errors import TiermoeError

# Every subcommand: the module that registers it (imported only when that command runs, so `tiermoe
# --help` and `tiermoe chat --url` never import torch) and its one-line help.
COMMANDS = {
    "generate": ("generate", "generate text from a prompt, streaming"),
    "demo": ("generate", "write text with the small MoE trained for tiermoe (--random: a random-weight one)"),
    "serve": ("server.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "chat": ("chat", "chat in the terminal"),
    "eval": ("evaluate", "perplexity of a checkpoint over a text file (sliding windows)"),
    "convert": (
        "convert",
        "quantize a checkpoint's experts (int4 in GPTQ's layout, fp8 with block scales, nvfp4)",
    ),
    "synth": ("bench.synth", "write a random-weight checkpoint with a real model's config"),
    "bench": ("bench.run", "time tiermoe and its peers; JSON and PNG under bench/results/"),
    "profile": ("hardware", "measure PCIe, disk, CPU and GPU ceilings and the decode floor"),
    "plan": ("plan", "find the fastest layout for a model and budget (measured costs, simulated candidates)"),
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
