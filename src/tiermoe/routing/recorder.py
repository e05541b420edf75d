"""Record every routed token's expert ids per MoE layer: `--record-routing FILE`.

Decode runs inside CUDA graphs, where nothing may reach the host, so ids are written on the device, at
the token's KV cache slot (each computed token of a running sequence owns one), and brought to the host
when its sequence ends, from the slots of its blocks. The file is rewritten whenever the engine goes
idle (so it is complete when a generate call returns) and, while requests keep coming, at most every
SAVE_EVERY_S seconds: rewriting it after every sequence would cost a server time quadratic in its trace.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .trace import Trace

SAVE_EVERY_S = 10.0


class TraceRecorder:
    def __init__(self, path: str | Path, moe_layers: list[int], num_experts: int, top_k: int, device):
        self.path, self.moe_layers, self.num_experts, self.k = Path(path), moe_layers, num_experts, top_k
        self.device = device
        self._buf: dict[str, torch.Tensor] = {}
        # one (seq, token, layer, prefill, step, experts) per finished sequence
        self._columns: list[tuple] = []
        self._unsaved = False
        self._saved_at = time.monotonic()

    def open(self, kv_slots: int) -> None:
        """Buffers for every slot of the KV cache (a captured graph writes into these very tensors)."""
        self._buf = {
            "ids": torch.zeros(len(self.moe_layers), kv_slots, self.k, dtype=torch.int32, device=self.device),
            "step": torch.zeros(kv_slots, dtype=torch.long, device=self.device),
            "counter": torch.zeros((), dtype=torch.long, device=self.device),
        }

    def state(self) -> list[torch.Tensor]:
        return [self._buf["counter"]] if self._buf else []

    def step(self, kv_slots: torch.Tensor) -> None:
        """kv_slots [B, S]: where this step's tokens live (padding writes the cache's null block)."""
        self._slots = kv_slots
        self._buf["counter"].add_(1)
        self._buf["step"][kv_slots] = self._buf["counter"]

    def observe(self, index: int, ids: torch.Tensor) -> None:
        """ids [B, S, k] of the MoE layer moe_layers[index] in the current step."""
        self._buf["ids"][index][self._slots] = ids.to(torch.int32)

    def end_sequence(self, doc: int, prompt_len: int, kv_slots: list[int]) -> None:
        """A sequence ended; kv_slots: the slots of its computed tokens, by position."""
        if not kv_slots:
            return
        where = torch.tensor(kv_slots, device=self.device)
        ids = self._buf["ids"][:, where].cpu().numpy()  # [L, N, k]
        steps = self._buf["step"][where].cpu().numpy()
        pos = np.arange(len(kv_slots))
        n, L = len(kv_slots), len(self.moe_layers)
        self._columns.append(
            (
                np.full(n * L, doc), np.tile(pos, L), np.repeat(self.moe_layers, n), np.tile(pos < prompt_len, L),
                np.tile(steps, L), ids.reshape(L * n, self.k),
            )
        )  # fmt: skip
        self._unsaved = True
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Rewrite the file if a sequence ended since it was last written."""
        if self._unsaved:
            self.save()
            self._unsaved, self._saved_at = False, time.monotonic()

    def trace(self) -> Trace:
        cols = [np.concatenate(c) for c in zip(*self._columns, strict=True)]
        return Trace.build(*cols, num_experts=self.num_experts)

    def save(self) -> Path:
        return self.trace().save(self.path)
