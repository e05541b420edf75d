"""Owns the model on its device: builds the KV cache and runs prefill and decode forwards."""

from __future__ import annotations

import torch

from ..models.base import MoEArgs
from ..models.layers import CausalLM
from .kv_cache import KVCache


class ModelRunner:
    def __init__(
        self, model: CausalLM, args: MoEArgs, device: torch.device, dtype: torch.dtype, prefill_chunk: int
    ):
        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        self.prefill_chunk = prefill_chunk
        self.pad_id = 0

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, batch, max_len, a.num_kv_heads, a.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad the prompts into one batch and run them in chunks. Returns (last logits [B, V] float32,
        next positions [B])."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            valid[row, width - len(prompt) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        logits = None
        for start in range(0, width, self.prefill_chunk):
            end = min(start + self.prefill_chunk, width)
            cache.start(valid[:, start:end])
            logits = self.model(ids[:, start:end], positions[:, start:end], cache, last_only=end == width)
            cache.commit()
        return logits, positions[:, -1] + 1

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, cache: KVCache):
        """tokens, positions [B] on device; active [B] bool (finished rows stay in the batch, masked)."""
        cache.start(active[:, None])
        logits = self.model(tokens[:, None], positions[:, None], cache)
        cache.commit()
        return logits
