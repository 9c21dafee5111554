"""The driver's id managers: KV blocks (tables, a free list, reference counts) and state slots.

Block ids are global: `BlockManager` hands them out and every stage holds the
same number of blocks (`pprt.models.kv`). A sequence's token t lives in block
`table[t // block_size]` at offset `t % block_size`. Hybrid models also give
each running sequence one state slot (`SlotManager`): the slot of its DeltaNet
layers' state on every stage, and under speculative decoding a second one for
a snapshot of that state. Ids only: no tensors.
"""

from __future__ import annotations


class OutOfBlocks(Exception):
    """Not enough free blocks for an allocation (the scheduler waits or preempts)."""


class BlockManager:
    """Block tables, a free list and reference counts for the global block ids."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.ref_count = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that `seq_id` can hold `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_hold(self, seq_id: int, num_tokens: int) -> bool:
        return self.extra_blocks(seq_id, num_tokens) <= self.num_free

    def reserve(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table."""
        need = self.extra_blocks(seq_id, num_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more blocks, {self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            block = self.free.pop()
            self.ref_count[block] = 1
            table.append(block)
        return table

    def truncate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Cut `seq_id`'s table to the blocks of its first `num_tokens` tokens (speculative decoding
        drops rejected positions); returns the table."""
        table = self.tables.get(seq_id, [])
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            block = table.pop()
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free.append(block)
        return table

    def fork(self, parent: int, child: int) -> list[int]:
        """Give `child` the blocks of `parent`, shared (reference counted)."""
        if child in self.tables:
            raise ValueError(f"sequence {child} already has blocks")
        table = list(self.tables[parent])
        for block in table:
            self.ref_count[block] += 1
        self.tables[child] = table
        return table

    def release(self, seq_id: int) -> None:
        """Drop `seq_id`'s table; blocks no other sequence uses return to the free list."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free.append(block)


class SlotManager:
    """State slots of the global slot ids: one per running sequence of a hybrid model."""

    def __init__(self, num_slots: int):
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out low ids first
        self.owner: dict[int, int] = {}  # seq_id -> slot
        self.snapshots: dict[int, int] = {}  # seq_id -> its second slot (speculative decoding's snapshot)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def slot(self, seq_id: int) -> int | None:
        return self.owner.get(seq_id)

    def acquire(self, seq_id: int) -> int:
        """`seq_id`'s slot, taking a free one if it has none; OutOfBlocks when none is free."""
        if seq_id in self.owner:
            return self.owner[seq_id]
        if not self.free:
            raise OutOfBlocks(f"sequence {seq_id} needs a state slot, none of {self.num_slots} is free")
        self.owner[seq_id] = slot = self.free.pop()
        return slot

    def acquire_snapshot(self, seq_id: int, spare: int = 0) -> int | None:
        """`seq_id`'s snapshot slot, taking a free one if it has none and more than `spare` are free
        (slots left for waiting sequences); None otherwise."""
        if seq_id in self.snapshots:
            return self.snapshots[seq_id]
        if len(self.free) <= spare:
            return None
        self.snapshots[seq_id] = slot = self.free.pop()
        return slot

    def snapshot(self, seq_id: int) -> int:
        return self.snapshots[seq_id]

    def release(self, seq_id: int) -> None:
        """Give `seq_id`'s slot and snapshot slot back (no-op when it holds none)."""
        for owner in (self.owner, self.snapshots):
            slot = owner.pop(seq_id, None)
            if slot is not None:
                self.free.append(slot)
