"""Which KV cache blocks each sequence owns: a free list over the paged cache (models/kv_cache.py).

The scheduler admits a request only when its next chunk's blocks are free, grows a running sequence one
block at a time, and gives every block back when the sequence finishes, is aborted or is preempted."""

from __future__ import annotations

from ..models.kv_cache import NULL_BLOCK, blocks_for


class BlockPool:
    def __init__(self, num_blocks: int):
        """num_blocks: the cache's blocks, NULL_BLOCK included (never handed out)."""
        self.capacity = num_blocks - 1
        self._free = [
            b for b in range(num_blocks - 1, -1, -1) if b != NULL_BLOCK
        ]  # pop() gives low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend `blocks` (a sequence's, in order) to hold `tokens`; False, and nothing taken, if the pool
        has too few free blocks."""
        need = blocks_for(tokens) - len(blocks)
        if need > len(self._free):
            return False
        blocks.extend(self._free.pop() for _ in range(max(need, 0)))
        return True

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()
