"""`python -m tiermoe.bench.load`: many streaming clients against a running OpenAI-compatible server.

Each of `--clients` clients sends a completion request, reads its stream to the end, and sends the next,
until `--duration-s` has passed. Every request must finish with its `max_tokens` tokens (ignore_eos) and a
usage block that says so; anything else is counted as a failure, with its message. Reported: requests
completed and failed, aggregate tokens per second, time to first token and inter-token latency (p50,
p99), and the server's resident memory sampled from its /metrics (flat, or growing) when it exposes
`process_resident_memory_bytes`. The result goes to bench/results/load-*.json with the provenance of
every result file.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..provenance import run_metadata, timestamp, write_json

PROMPT_WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
)


@dataclass
class Outcome:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    failures: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of values by linear interpolation; None when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, round(q * 1000) - 1)]


def prompt(client: int, n: int, words: int) -> str:
    """A distinct prompt per client and request, so no two share a prefix by accident."""
    return " ".join(PROMPT_WORDS[(client + n + i) % len(PROMPT_WORDS)] for i in range(words))


async def one_client(aclient, model: str, client: int, words: int, max_tokens: int, end: float, out: Outcome):
    n = 0
    while time.monotonic() < end:
        n += 1
        start = time.perf_counter()
        stamps, usage, finish = [], None, None
        try:
            stream = await aclient.completions.create(
                model=model, prompt=prompt(client, n, words), max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices:
                    stamps.append(time.perf_counter())
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
        except Exception as exc:  # a failed request is a finding of the test, not the end of it
            out.failures.append(f"client {client} request {n}: {type(exc).__name__}: {exc}")
            continue
        got = usage.completion_tokens if usage else None
        if finish != "length" or got != max_tokens:
            out.failures.append(f"client {client} request {n}: finish {finish}, usage {got} of {max_tokens}")
            continue
        out.completed += 1
        out.tokens += got
        out.ttft_s.append(stamps[0] - start)
        out.itl_s += [b - a for a, b in itertools.pairwise(stamps)]


async def sample_memory(url: str, end: float, every_s: float, samples: list[tuple[float, float]]):
    """The server's resident memory from its /metrics, every `every_s` seconds until `end`."""

    def read() -> str:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as r:
            return r.read().decode()

    t0 = time.monotonic()
    while True:
        try:
            for line in (await asyncio.to_thread(read)).splitlines():
                if line.startswith("process_resident_memory_bytes "):
                    samples.append((round(time.monotonic() - t0, 1), float(line.split()[1])))
        except OSError:  # the server is busy or gone: the gap shows in the samples
            pass
        if time.monotonic() >= end:
            return
        await asyncio.sleep(min(every_s, max(0.0, end - time.monotonic())))


async def load(url: str, model: str, clients: int, duration_s: float, words: int, max_tokens: int) -> dict:
    import openai

    out, memory = Outcome(), []
    end = time.monotonic() + duration_s
    start = time.perf_counter()
    async with openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0) as aclient:
        await asyncio.gather(
            sample_memory(url, end, max(1.0, duration_s / 20), memory),
            *(one_client(aclient, model, c, words, max_tokens, end, out) for c in range(clients)),
        )
    wall_s = time.perf_counter() - start
    rss = [b for _, b in memory]
    return {
        "clients": clients,
        "duration_s": duration_s,
        "wall_s": round(wall_s, 3),
        "prompt_words": words,
        "max_tokens": max_tokens,
        "completed": out.completed,
        "failed": len(out.failures),
        "failures": out.failures[:20],
        "completion_tokens": out.tokens,
        "aggregate_tok_s": out.tokens / wall_s,
        "ttft_p50_s": percentile(out.ttft_s, 0.5),
        "ttft_p99_s": percentile(out.ttft_s, 0.99),
        "itl_p50_s": percentile(out.itl_s, 0.5),
        "itl_p99_s": percentile(out.itl_s, 0.99),
        "server_rss_bytes": memory,
        "server_rss_growth": (rss[-1] - rss[len(rss) // 4]) / rss[len(rss) // 4] if len(rss) >= 4 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiermoe.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=120.0)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    result = asyncio.run(
        load(args.url, args.model, args.clients, args.duration_s, args.prompt_words, args.max_tokens)
    )
    command = ["python", "-m", "tiermoe.bench.load", *(sys.argv[1:] if argv is None else argv)]
    path = write_json(Path(args.out_dir) / f"load-{timestamp()}.json", {**run_metadata(command), **result})
    fmt = lambda v, scale=1000: "-" if v is None else f"{v * scale:.1f} ms"  # noqa: E731
    print(
        f"load: {result['completed']} completed, {result['failed']} failed, "
        f"{result['aggregate_tok_s']:.1f} tok/s; TTFT p50 {fmt(result['ttft_p50_s'])} p99 {fmt(result['ttft_p99_s'])}; "
        f"inter-token p50 {fmt(result['itl_p50_s'])} p99 {fmt(result['itl_p99_s'])}; saved {path}"
    )
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
