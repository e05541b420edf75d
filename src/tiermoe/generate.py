"""`tiermoe generate` and `tiermoe demo`: stream one completion to the terminal, then a stats line."""

from __future__ import annotations

import argparse
import sys

from .flags import add_engine_args, add_sampling_args, engine_kwargs, sampling_params


def add_parser(sub) -> None:
    p = sub.add_parser("generate")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: read standard input)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--no-think", action="store_true", help="with --chat: switch the template's thinking off")
    p.set_defaults(func=run_generate)

    d = sub.add_parser("demo")
    d.add_argument("--device", default=None)
    d.add_argument("--dtype", default=None)
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--prompt", default="What is the capital of France?")
    d.set_defaults(func=run_demo)


def run_generate(args: argparse.Namespace) -> int:
    from .api import LLM

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = LLM(args.model, **engine_kwargs(args))
    stream(
        llm, prompt, sampling_params(args), chat=args.chat, enable_thinking=False if args.no_think else None
    )
    return 0


def stream(llm, prompt: str, params, chat: bool = False, enable_thinking: bool | None = None) -> None:
    ids = (
        llm.encode(
            llm.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=enable_thinking),
            False,
        )
        if chat
        else llm.encode(prompt)
    )
    for event in llm.stream(ids, params):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        if event.stats is not None:
            sys.stdout.write("\n")
            print(f"[{event.finish_reason}] {event.stats.line()}", file=sys.stderr)


def run_demo(args: argparse.Namespace) -> int:
    from .api import LLM
    from .demo import DEMO_CONFIG, cache_dir, write_demo_checkpoint
    from .engine.request import SamplingParams

    path = write_demo_checkpoint(cache_dir())
    c = DEMO_CONFIG
    print(
        f"demo checkpoint: {path}\n"
        f"architecture Qwen3MoeForCausalLM, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_experts']} experts (top-{c['num_experts_per_tok']}), vocab {c['vocab_size']}.\n"
        "The weights are RANDOM: the text below is gibberish; it shows the engine working end to end.",
        file=sys.stderr,
    )
    llm = LLM(path, device=args.device, dtype=args.dtype, show_progress=True)
    print(f"prompt (chat template applied): {args.prompt}", file=sys.stderr)
    # Sampled rather than greedy: greedy decoding of random weights repeats one token.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True)
    stream(llm, args.prompt, params, chat=True)
    return 0
