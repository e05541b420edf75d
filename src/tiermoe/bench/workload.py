"""The work every engine in a comparison is given: the same seeded prompt token ids, the same lengths."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workload:
    """batch prompts of prompt_len random token ids, each continued by exactly gen_len tokens
    (greedy, eos ignored), timed `repeat` times after one warm-up."""

    prompt_len: int
    gen_len: int
    batch: int = 1
    repeat: int = 3
    seed: int = 0

    def __post_init__(self):
        if min(self.prompt_len, self.gen_len, self.batch, self.repeat) < 1:
            raise ValueError("prompt_len, gen_len, batch and repeat must all be at least 1")


def random_prompts(vocab_size: int, workload: Workload, run: int = 0) -> list[list[int]]:
    """Token ids drawn uniformly from the vocabulary with a seeded CPU generator: identical in every
    process, so tiermoe and the peers (run in subprocesses) see the same prompts. Each timed run gets
    its own prompts: repeating one prompt would let an expert cache replay the previous run's routing."""
    gen = torch.Generator().manual_seed(workload.seed * 1_000_003 + run)
    ids = torch.randint(0, vocab_size, (workload.batch, workload.prompt_len), generator=gen)
    return ids.tolist()


# The figures a timed run yields; the summary of several runs is their median.
FIGURES = ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_gpu_gib", "peak_host_gib")


def median_figures(samples: list[dict]) -> dict:
    """Median of each figure over the timed runs (peaks: the maximum, since one spike is what OOMs)."""
    out = {}
    for key in FIGURES:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            out[key] = None
        elif key.startswith("peak_"):
            out[key] = max(values)
        else:
            out[key] = statistics.median(values)
    return out
