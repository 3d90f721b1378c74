"""BlockManager: hands out fixed-size KV-cache blocks to sequences and takes them back."""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """A free list over blocks 1..num_blocks-1; block 0 is the scratch block padded graph rows write into."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity_tokens(self) -> int:
        """Most tokens one sequence can ever hold."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``new_tokens`` more cached tokens."""
        total = -(-(seq.num_computed + new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, new_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, new_tokens) + reserve <= self.num_free

    def grow(self, seq: Sequence, new_tokens: int) -> None:
        """Give ``seq`` the blocks for ``new_tokens`` more tokens (check ``can_grow`` first)."""
        for _ in range(self.blocks_needed(seq, new_tokens)):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
