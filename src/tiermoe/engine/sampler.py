"""Turn logits into the next token per sequence: repetition penalty, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from .request import SamplingParams


class Sampler:
    """One per sequence: holds its params and its random generator, so seeds reproduce per request."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits [V] float32; seen: token ids so far (prompt and output) for the repetition penalty."""
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty
            )
        if p.temperature == 0:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Drop a token when the ones before it already reach top_p; the first always stays.
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
