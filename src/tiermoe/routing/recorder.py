"""Record every routed token's expert ids per MoE layer: `--record-routing FILE`.

Decode runs inside CUDA graphs, where nothing may reach the host, so ids are written on the device into
buffers indexed by (layer, batch row, position) and brought to the host once, when the run ends. The
buffers are kept per (batch size, cache length) like the KV cache, since a captured graph writes into
the very tensors it saw at capture. The file is rewritten after every run, so it is complete whenever a
request has finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .trace import Trace


class TraceRecorder:
    def __init__(self, path: str | Path, moe_layers: list[int], num_experts: int, top_k: int, device):
        self.path, self.moe_layers, self.num_experts, self.k = Path(path), moe_layers, num_experts, top_k
        self.device = device
        self._buffers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._run: dict | None = None
        self._columns: list[tuple] = []  # one (seq, token, layer, prefill, step, experts) per finished run
        self._steps_before = 0  # step numbers continue across runs

    def begin_run(self, docs: list[int], prompt_lens: list[int], max_len: int) -> None:
        b = len(docs)
        key = (b, max_len)
        if key not in self._buffers:
            self._buffers[key] = {
                # position max_len is where padding and finished rows write: never read back
                "ids": torch.empty(
                    len(self.moe_layers), b, max_len + 1, self.k, dtype=torch.int32, device=self.device
                ),
                "step": torch.empty(b, max_len + 1, dtype=torch.long, device=self.device),
                "seen": torch.empty(b, max_len + 1, dtype=torch.bool, device=self.device),
                "counter": torch.zeros((), dtype=torch.long, device=self.device),
                "rows": torch.arange(b, device=self.device)[:, None],
                # written by index: a Python True would be copied from the host, which a graph cannot do
                "true": torch.ones((), dtype=torch.bool, device=self.device),
            }
        buf = self._buffers[key]
        buf["seen"].zero_()
        buf["counter"].zero_()
        self._run = {"buf": buf, "docs": docs, "prompt_lens": prompt_lens, "max_len": max_len}

    def state(self) -> list[torch.Tensor]:
        return [self._run["buf"]["counter"]] if self._run else []

    def step(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        buf = self._run["buf"]
        self._where = torch.where(valid, positions, self._run["max_len"])  # [B, S]
        buf["counter"].add_(1)
        buf["step"][buf["rows"], self._where] = buf["counter"]
        buf["seen"][buf["rows"], self._where] = buf["true"]

    def observe(self, index: int, ids: torch.Tensor) -> None:
        """ids [B, S, k] of the MoE layer moe_layers[index] in the current step."""
        buf = self._run["buf"]
        buf["ids"][index][buf["rows"], self._where] = ids.to(torch.int32)

    def end_run(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        buf, max_len = run["buf"], run["max_len"]
        seen = buf["seen"][:, :max_len].cpu().numpy()  # [B, P]
        rows, pos = np.nonzero(seen)
        if len(rows) == 0:
            return
        ids = buf["ids"][:, :, :max_len].cpu().numpy()[:, rows, pos]  # [L, N, k]
        steps = buf["step"][:, :max_len].cpu().numpy()[rows, pos] + self._steps_before
        self._steps_before = int(steps.max())
        docs = np.asarray(run["docs"])[rows]
        prefill = pos < np.asarray(run["prompt_lens"])[rows]
        n, L = len(rows), len(self.moe_layers)
        self._columns.append(
            (
                np.tile(docs, L), np.tile(pos, L), np.repeat(self.moe_layers, n), np.tile(prefill, L),
                np.tile(steps, L), ids.reshape(L * n, self.k),
            )
        )  # fmt: skip
        self.save()

    def trace(self) -> Trace:
        cols = [np.concatenate(c) for c in zip(*self._columns, strict=True)]
        return Trace.build(*cols, num_experts=self.num_experts)

    def save(self) -> Path:
        return self.trace().save(self.path)
