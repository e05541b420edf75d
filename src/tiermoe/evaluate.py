"""`tiermoe eval`: perplexity of a checkpoint over a text file, the quality check of every lossy feature.

Sliding windows as in transformers' perplexity guide: windows of `context` tokens start every `stride`
tokens; each window scores only the tokens no earlier window scored, so every token after the first
window is predicted from at least context - stride tokens of history. The first token of the text has
no history and is not scored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InvalidRequestError
from .flags import add_engine_args, engine_kwargs


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_per_token: float  # nats
    tokens_scored: int
    context: int  # tokens per window
    stride: int  # tokens between window starts
    seconds: float

    def line(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} | {self.nll_per_token:.4f} nats/token over {self.tokens_scored} "
            f"tokens | context {self.context}, stride {self.stride} | {self.tokens_scored / self.seconds:.1f} tok/s"
        )


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored): window ids[begin:end] scores its last `scored` next-token predictions."""
    out, prev_end = [], 1  # token 0 is never a target
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        if end > prev_end:
            out.append((begin, end, end - prev_end))
            prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(llm, ids: list[int], context: int | None = None, stride: int | None = None) -> Perplexity:
    """Perplexity of `llm` over token ids. context: tokens per window (default: the model's context, at
    most the KV reserve); stride: default context // 2."""
    runner = llm.engine.runner
    longest = min(llm.max_model_len, runner.kv_tokens)  # the model's context and the KV cache reserve
    context = context or longest
    stride = stride or max(1, context // 2)
    if not 2 <= context <= longest:
        raise InvalidRequestError(
            f"context must be 2 to {longest} tokens (the model's context and the KV cache reserve, "
            f"--kv-reserve-tokens); got {context}",
            "context",
        )
    if not 1 <= stride <= context - 1:
        raise InvalidRequestError(
            f"stride must be 1 to context - 1 = {context - 1} tokens; got {stride}", "stride"
        )
    if len(ids) < 2:
        raise InvalidRequestError("the text has fewer than 2 tokens: nothing to predict", "text")
    start, nll, scored = time.perf_counter(), 0.0, 0
    for begin, end, count in windows(len(ids), context, stride):
        logprobs = llm.engine.score(ids[begin:end])
        nll -= float(logprobs[-count:].double().sum())
        scored += count
    return Perplexity(
        math.exp(nll / scored), nll / scored, scored, context, stride, time.perf_counter() - start
    )


def run(args: argparse.Namespace) -> int:
    from .api import LLM  # torch is heavy: only once the command runs

    path = Path(args.text)
    if not path.is_file():
        raise InvalidRequestError(f"--text {path}: no such file", "text")
    llm = LLM(args.model, **engine_kwargs(args))
    if llm.tokenizer is None:
        raise InvalidRequestError(f"{args.model} has no tokenizer: tiermoe eval reads text", "text")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = llm.encode(text, prompt_of_request=False)[: args.max_tokens or None]
    result = perplexity(llm, ids, args.context, args.stride)
    print(result.line())
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": str(args.model), "text": str(path), **asdict(result)}) + "\n"
        )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per window (default: the context, at most the KV reserve)",
    )
    p.add_argument(
        "--stride", type=int, default=None, help="tokens between window starts (default: context / 2)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.set_defaults(func=run)
    return p
