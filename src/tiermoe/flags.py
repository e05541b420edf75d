"""The flags the commands that run a model share (generate, chat, serve): engine and sampling settings,
and their translation into LLM(...) keywords and SamplingParams."""

from __future__ import annotations

import argparse

from .engine.request import SamplingParams
from .offload.policy import POLICIES  # the policy registry: plain Python, no torch


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
    p.add_argument("--eviction", default="lfu", choices=list(POLICIES), help="GPU expert slot policy")
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
