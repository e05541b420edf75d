"""Static KV cache for a batch of left-padded sequences that advance together.

Every row writes at the same slot cursor; `valid` marks which slots hold real tokens (left padding and
finished rows are invalid), so a row's real tokens stay contiguous and slot distance equals position
distance, which is what sliding-window masks need.

Two ways to run a step: `start` / `commit` with the cursor as a Python int (prefill and eager decode:
attention sees only the slots written so far), or `start_static` with the cursor in a device tensor
(decode under a CUDA graph: every shape is fixed, attention spans the whole cache under a mask).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # slots committed
        self._new = 0  # slots being written by the forward in flight
        self._masks: dict[int | None, torch.Tensor] = {}
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # the slot a static step writes
        self._static = False
        self._slots = torch.arange(max_len, device=device)

    def reset(self) -> None:
        """Forget every sequence; the memory (and any graph captured over it) is kept."""
        self.valid.zero_()
        self.length = 0

    def start(self, valid_new: torch.Tensor) -> None:
        """Open a step that writes valid_new.shape[1] slots at the cursor; valid_new: [B, T] bool."""
        t = valid_new.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} > {self.max_len} slots")
        self.valid[:, self.length : self.length + t] = valid_new
        self._new, self._static = t, False
        self._masks.clear()

    def start_static(self, active: torch.Tensor) -> None:
        """Open a one-slot step at the device-side cursor; active: [B] bool. Capturable in a graph."""
        self.valid.index_copy_(1, self.cursor, active[:, None])
        self._new, self._static = 1, True
        self._masks.clear()

    def commit(self) -> None:
        self.length += self._new
        self._new = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, D] at the cursor; return the keys and values attention may see."""
        if self._static:
            self.k[layer].index_copy_(2, self.cursor, k)
            self.v[layer].index_copy_(2, self.cursor, v)
            return self.k[layer], self.v[layer]
        end = self.length + self._new
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, t: int, window: int | None) -> torch.Tensor:
        """[B, 1, T, L] bool: query slot sees key slot if valid, not in the future, inside the window.

        A query always sees itself, so padding rows attend to something and never produce NaN."""
        if window not in self._masks:
            if self._static:
                q, kpos = self.cursor[:, None], self._slots[None, :]
            else:
                end = self.length + self._new
                q = torch.arange(self.length, end, device=self.valid.device)[:, None]
                kpos = self._slots[None, :end]
            allowed = kpos <= q
            if window:
                allowed &= q - kpos < window
            mask = allowed[None] & self.valid[:, None, : kpos.shape[1]]
            mask |= (kpos == q)[None]
            self._masks[window] = mask[:, None]
        return self._masks[window]
