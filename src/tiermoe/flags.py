"""The flags the commands that run a model share (generate, chat, serve): engine and sampling settings,
and their translation into LLM(...) keywords and SamplingParams."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .config import DENSE_WEIGHTS, MISS_PATHS, PRESETS, EngineConfig
from .engine.request import SamplingParams
from .offload.policy import POLICIES  # the policy registry: plain Python, no torch

# Choices of a setting, from the registry that implements it.
CHOICES = {"eviction": list(POLICIES), "miss_path": list(MISS_PATHS), "dense_weights": list(DENSE_WEIGHTS)}


def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _engine_fields():
    return [f for f in fields(EngineConfig) if f.metadata.get("flag") != ""]


def add_engine_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    """A flag for every EngineConfig setting, its help and default from the field (so no default lives
    here: an absent flag leaves the field's own); model=False leaves --model to the caller (chat pairs
    it with --url)."""
    if model:
        p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="the layout `tiermoe plan` finds fastest for this model and budget (planned once, then saved): "
        "latency, throughput (the most KV tokens within 10%% of the fastest), balanced (within 5%%), auto "
        "(throughput for serve, else latency); flags given beside it win",
    )
    for f in _engine_fields():
        help_text = f.metadata["help"]
        if f.type in ("bool", bool):
            p.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {'on' if f.default else 'off'})")  # fmt: skip
            continue
        kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(f.type, str)
        shown = "" if f.default is None or "default:" in help_text else f" (default: {f.default})"
        p.add_argument(
            _flag(f),
            dest=f.name,
            type=kind,
            default=None,
            choices=CHOICES.get(f.name),
            metavar="GIB" if f.name.endswith("_gib") else None,
            help=help_text + shown,
        )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keywords of the flags given; the rest keep EngineConfig's defaults."""
    given = {
        f.name: getattr(args, f.name) for f in _engine_fields() if getattr(args, f.name, None) is not None
    }
    if (
        getattr(args, "preset", None)
        and getattr(args, "model", None)
        and getattr(args, "command", None) != "plan"
    ):
        from .planning import resolve  # plans (loads the model once) when none is saved

        given = resolve(args.model, given, args.preset, args.command)
    return {**given, "show_progress": True}


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
