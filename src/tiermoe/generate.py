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
    d.add_argument(
        "--random",
        action="store_true",
        help="a random-weight checkpoint instead of the trained one (gibberish; to try the offload flags on)",
    )
    d.add_argument("--prompt", default=None, help="default: the opening of a scene, then of a Python module")
    d.add_argument("--max-tokens", type=int, default=80, help="tokens written after each prompt")
    d.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_engine_args(d, model=False)
    d.set_defaults(func=run_demo)


def run_generate(args: argparse.Namespace) -> int:
    from .api import LLM

    params = sampling_params(args)  # before the model loads: a bad flag fails at once
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = LLM(args.model, **engine_kwargs(args))
    stream(llm, prompt, params, chat=args.chat, enable_thinking=False if args.no_think else None)
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


# The trained demo's default prompts: one of each thing it learnt to write.
DEMO_PROMPTS = ("KING HENRY.\n", "import os\n\n\ndef ")


def run_demo(args: argparse.Namespace) -> int:
    from .api import LLM
    from .demo import random_cache_dir, trained_checkpoint, write_random_checkpoint
    from .engine.request import SamplingParams

    if args.random:
        path = write_random_checkpoint(random_cache_dir())
        about = "The weights are RANDOM: the text below is gibberish; it shows the engine working end to end."
        prompts = [args.prompt or "What is the capital of France?"]
        # Sampled rather than greedy: greedy decoding of random weights repeats one token.
        params = SamplingParams(args.max_tokens, temperature=1.0, top_p=0.95, seed=args.seed, ignore_eos=True)
    else:
        path = trained_checkpoint()
        about = "Trained on Shakespeare's plays and Python's standard library (docs/demo-model.md)."
        prompts = [args.prompt] if args.prompt is not None else list(DEMO_PROMPTS)
        params = SamplingParams(args.max_tokens, seed=args.seed)  # sampling: generation_config.json's
    print(f"demo checkpoint: {path}\n{about}", file=sys.stderr)
    llm = LLM(path, **engine_kwargs(args))
    a = llm.args
    print(
        f"{llm.source.arch.name}: {a.num_layers} layers, hidden {a.hidden_size}, "
        f"{a.num_experts} experts (top-{a.top_k}), vocab {a.vocab_size}",
        file=sys.stderr,
    )
    for i, prompt in enumerate(prompts):
        sys.stdout.write("\n" if i else "")
        print(f"--- prompt {prompt!r}", file=sys.stderr)
        if not args.random:  # a completion reads on from its prompt
            sys.stdout.write(prompt)
        stream(llm, prompt, params, chat=args.random)
    return 0
