"""The driver's id managers: KV blocks (tables, reference counts, a free list, the prefix cache's map)
and state slots.

Block ids are global: `BlockManager` hands them out and every stage holds the
same number of blocks (`pprt.models.kv`). A sequence's token t lives in block
`table[t // block_size]` at offset `t % block_size`. Hybrid models also give
each running sequence one state slot (`SlotManager`): the slot of its DeltaNet
layers' state on every stage, and under speculative decoding a second one for
a snapshot of that state. Ids only: no tensors.

Prefix caching (the keys and the reuse decision are `pprt.engine.prefix`'s):
a full block may be registered under the hash of its contents. A registered
block that no sequence references any more is not freed but kept, evictable,
in least-recently-released order; an allocation takes a block that holds
nothing first and evicts the least recently released cached block only when
none is left. So cached blocks count as free (`num_free`), and a new sequence
may start its table with cached blocks (`reserve(..., cached=)`), which
takes them out of the evictable set. Sequences release their tables last
block first, so a chain's tail is evicted before its head.

The prefix cache's state snapshots (hybrid models) are `SnapshotCache`'s:
slots of the state pools past the running ones, named by block hashes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class OutOfBlocks(Exception):
    """Not enough free blocks for an allocation (the scheduler waits or preempts)."""


class BlockManager:
    """Block tables, reference counts, a free list and the hash -> block map of cached blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # hold nothing; pop() hands out low ids first
        # unreferenced blocks holding a cached block's KV, least recently released first
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.ref_count = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.cached: dict[bytes, int] = {}  # block hash -> block holding it
        self.hash_of: dict[int, bytes] = {}  # block -> its registered hash
        self.num_evictions = 0  # cached blocks dropped to make room (total)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones and unreferenced cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (referenced or evictable)."""
        return len(self.cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, num_tokens: int, cached: Sequence[int] = ()) -> int:
        """Blocks the free pool must give so that `seq_id` holds `num_tokens` tokens, its table
        started with `cached` (cached blocks nobody references leave the free pool too)."""
        have = len(self.tables.get(seq_id, ())) + len(cached)
        taken = sum(1 for b in cached if self.ref_count[b] == 0)
        return max(0, self.blocks_needed(num_tokens) - have) + taken

    def can_hold(self, seq_id: int, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        return self.extra_blocks(seq_id, num_tokens, cached) <= self.num_free

    def reserve(self, seq_id: int, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table.

        cached: blocks from `match` that start the table of a sequence that holds none (their
        KV is reused, shared with other holders). Raises OutOfBlocks (nothing taken) or ValueError.
        """
        need = self.extra_blocks(seq_id, num_tokens, cached)
        if need > self.num_free:
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more blocks, {self.num_free} free")
        if cached:
            if seq_id in self.tables:
                raise ValueError(f"sequence {seq_id} already has blocks: cached blocks only start a table")
            for block in cached:
                if block not in self.hash_of:
                    raise ValueError(f"block {block} holds no cached prefix")
                self.evictable.pop(block, None)
                self.ref_count[block] += 1
            self.tables[seq_id] = list(cached)
        table = self.tables.setdefault(seq_id, [])
        for _ in range(self.blocks_needed(num_tokens) - len(table)):
            block = self._allocate()
            self.ref_count[block] = 1
            table.append(block)
        return table

    def _allocate(self) -> int:
        if self.free:
            return self.free.pop()
        block, _ = self.evictable.popitem(last=False)  # the least recently released cached block
        del self.cached[self.hash_of.pop(block)]
        self.num_evictions += 1
        return block

    def truncate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Cut `seq_id`'s table to the blocks of its first `num_tokens` tokens (speculative decoding
        drops rejected positions); returns the table."""
        table = self.tables.get(seq_id, [])
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            self._unref(table.pop())
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
        """Drop `seq_id`'s table, last block first: a block no other sequence uses becomes free, or
        evictable when it holds a cached block."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self._unref(block)

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    # ---- the prefix cache's map ------------------------------------------------------------------
    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of `hashes` (a chain: block i's hash covers
        blocks 0..i). Takes nothing: pass them to `reserve`."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, block: int, block_hash: bytes) -> bool:
        """Record that `block` (referenced, full, its KV computed or on its way in an earlier or the
        same step) holds the block named `block_hash`. False when another block holds it already
        (then this one stays private) or `block` is registered under another hash."""
        if self.ref_count[block] <= 0:
            raise ValueError(f"block {block} is not in use: only a sequence's block can be registered")
        if block_hash in self.cached or block in self.hash_of:
            return False
        self.cached[block_hash] = block
        self.hash_of[block] = block_hash
        return True

    def forget(self, block: int) -> None:
        """Drop `block`'s registration (its KV will not be computed after all); no-op when it has none."""
        block_hash = self.hash_of.pop(block, None)
        if block_hash is None:
            return
        del self.cached[block_hash]
        if block in self.evictable:  # unreferenced: now it holds nothing
            del self.evictable[block]
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


class SnapshotCache:
    """State snapshots of the prefix cache (hybrid models): slot ids [first, first + num_snapshots) of
    the stages' state pools, each holding the state after a full block, named by that block's hash.

    A slot is taken (`take`) for a step that will save into it, and becomes a cached snapshot once
    that step completed on every stage (`commit`), or goes back (`drop`). Cached snapshots are
    found by hash (`find`, which marks them used) and evicted least recently used first when a
    slot is taken and none is free. No reference counts: a restore reads its snapshot before its
    step runs, and every stage runs steps in order, so a slot taken later for a save never
    overwrites a snapshot before an earlier restore has read it.
    """

    def __init__(self, first: int, num_snapshots: int):
        if first < 0 or num_snapshots < 0:
            raise ValueError(f"SnapshotCache needs first >= 0 and num_snapshots >= 0, got {first}, {num_snapshots}")
        self.first, self.num_snapshots = first, num_snapshots
        self.free: list[int] = list(range(first + num_snapshots - 1, first - 1, -1))
        self.cached: OrderedDict[bytes, int] = OrderedDict()  # block hash -> slot, least recently used first
        self.hash_of: dict[int, bytes] = {}
        self.num_evictions = 0

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def find(self, block_hash: bytes) -> int | None:
        """The slot holding the state after the block `block_hash` names (marked used), or None."""
        slot = self.cached.get(block_hash)
        if slot is not None:
            self.cached.move_to_end(block_hash)
        return slot

    def has(self, block_hash: bytes) -> bool:
        return block_hash in self.cached

    def take(self) -> int | None:
        """A slot to save into: a free one, else the least recently used snapshot's; None when every
        slot waits for a save."""
        if self.free:
            return self.free.pop()
        if not self.cached:
            return None
        _, slot = self.cached.popitem(last=False)
        del self.hash_of[slot]
        self.num_evictions += 1
        return slot

    def commit(self, slot: int, block_hash: bytes) -> None:
        """The save into `slot` (from `take`) completed: it holds the state after `block_hash`'s block
        (given back when another slot already does)."""
        if block_hash in self.cached:
            self.free.append(slot)
            return
        self.cached[block_hash] = slot
        self.hash_of[slot] = block_hash

    def drop(self, slot: int) -> None:
        """Give back a slot from `take` whose save will not complete."""
        self.free.append(slot)
