"""Paged KV cache: every sequence's keys and values in blocks of BLOCK_TOKENS slots from one pool.

The pool is allocated once (the memory plan's KV reserve); which blocks a sequence owns is the engine's
business (engine/kv_blocks.py). A forward runs rows of different sequences at different lengths: the
runner describes it in a `KVBatch` (per row: its block table, its tokens' flat slots, its length after the
forward), binds it, and every attention layer writes its new keys and values at those slots and attends
to its row's blocks gathered in order, so a key's index in the gathered row is its position.

Block 0 is never handed out: padding tokens write there and padding rows read it, so every shape can stay
fixed under a CUDA graph (the batch's tensors are then static buffers the runner refills per replay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16  # slots per block: small enough that a sequence wastes little, large enough to gather fast
NULL_BLOCK = 0


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def slots(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The flat slots of `positions` of a sequence whose blocks are `table` (long tensors)."""
    return table[positions // BLOCK_TOKENS] * BLOCK_TOKENS + positions % BLOCK_TOKENS


def slots_of(blocks: list[int], tokens: int) -> list[int]:
    """The flat slots of a sequence's first `tokens` positions."""
    return slots(torch.tensor(blocks, dtype=torch.long), torch.arange(tokens)).tolist()


def cache_slots(kv_tokens: int) -> int:
    """The slots a cache holding `kv_tokens` tokens allocates: whole blocks, and the null block."""
    return (blocks_for(kv_tokens) + 1) * BLOCK_TOKENS


@dataclass
class KVBatch:
    """One forward's rows, all device tensors. B rows of T tokens (right-padded), NB blocks a row."""

    tables: torch.Tensor  # [B, NB] long: each row's blocks in order; NULL_BLOCK past its end
    slots: torch.Tensor  # [B, T] long: the flat slot each token writes (block * BLOCK_TOKENS + offset)
    positions: torch.Tensor  # [B, T] long: each token's position in its sequence (padding: 0)
    lengths: torch.Tensor  # [B] long: each row's tokens in the cache once this forward has written

    @property
    def width(self) -> int:
        """Key slots a row attends over: NB blocks."""
        return self.tables.shape[1] * BLOCK_TOKENS


class KVCache:
    """Per layer, the tensors it caches per token (GQA: keys and values; MLA: one compressed latent), each
    a flat [slots, heads, dim] pool."""

    def __init__(
        self,
        layers: list[tuple[tuple[int, int], ...]],
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        """layers: per layer, the (heads, dim) of each tensor it caches (AttentionSpec.cache_shapes)."""
        slots = num_blocks * BLOCK_TOKENS
        self.parts = [
            [torch.zeros((slots, h, d), dtype=dtype, device=device) for h, d in shapes] for shapes in layers
        ]
        self.num_blocks = num_blocks
        self.batch: KVBatch | None = None
        self._gather: torch.Tensor | None = None
        self._masks: dict[int | None, torch.Tensor] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.parts for t in layer)

    def bind(self, batch: KVBatch) -> None:
        """The forward about to run. Derived tensors are built here (once, not per layer); inside a graph
        capture they are built from the static buffers, so every replay recomputes them."""
        self.batch = batch
        offsets = torch.arange(BLOCK_TOKENS, device=batch.tables.device)
        # [B, NB, BLOCK] -> [B, NB * BLOCK]: the flat slot of each key position of each row
        self._gather = (batch.tables[:, :, None] * BLOCK_TOKENS + offsets).flatten(1)
        self._masks = {}

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each of the layer's tensors [B, heads, T, D] at the batch's slots; return each over
        every row's keys so far, [B, heads, NB * BLOCK, D], in position order."""
        slots = self.batch.slots.reshape(-1)
        out = []
        for pool, x in zip(self.parts[layer], new, strict=True):
            b, h, t, d = x.shape
            pool.index_copy_(0, slots, x.transpose(1, 2).reshape(b * t, h, d))
            out.append(pool[self._gather].transpose(1, 2))  # [B, NB * BLOCK, h, d] -> [B, h, L, d]
        return tuple(out)

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, T, L] bool: a query sees the keys of its row at or before its position, written by now,
        inside the window. A query always sees its own position, so padding attends to something and
        never produces NaN."""
        if window not in self._masks:
            batch = self.batch
            q = batch.positions[:, :, None]  # [B, T, 1]
            kpos = torch.arange(batch.width, device=q.device)[None, None, :]  # [1, 1, L]
            allowed = (kpos <= q) & (kpos < batch.lengths[:, None, None])
            if window:
                allowed &= q - kpos < window
            self._masks[window] = (allowed | (kpos == q))[:, None]
        return self._masks[window]
