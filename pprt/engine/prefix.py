"""Prefix caching's key and its reuse decision: which full KV blocks (and, for hybrid models, which
state snapshot) a sequence takes from the cache.

A full block is named by a hash chained over its parent block's hash and its
token ids; the chain's root is a salt naming everything else that decides the
KV (the rope settings, the dtypes, the quantization), joined per request by
the sequence's `cache_key` (its LoRA adapter's load, so KV computed under one
adapter never serves another or the base model). Two sequences whose first k blocks hold the same tokens
under the same salt share those k hashes, so blocks computed for one serve
the other. With MTP drafting (`lookahead=1`) a block's hash also covers the
token after it: the MTP head's KV at a block's last position depends on that
token (pprt.distributed.mtp_drafts), so a block is registered only once the
token after it is known, and only a sequence with the same next token reuses it. The digest is BLAKE2b-128 (hashlib) of the parent digest and the
block's token ids as little-endian int64: collisions are not a practical
concern, unlike a 64-bit Python hash of a tuple.

`PrefixCache` computes a sequence's hashes as its tokens fill blocks and
registers its full blocks in the `BlockManager`'s map (at scheduling time:
each stage runs steps in order, so a later step, or a later sequence of the
same step, whose attention writes every token's K/V before reading, finds
the block computed). `reusable` is the one decision of what a new sequence
may reuse: the longest run of cached full blocks, leaving at least one token
to compute (its logits give the next token), so a prompt that is entirely
cached recomputes its last block. Only full blocks are shared, so no block a
sequence writes into is ever shared.

Hybrid models (Gated DeltaNet layers) cannot resume from KV blocks alone: the
recurrent and conv state after the reused prefix must come from a snapshot
(`SnapshotCache`, slots of the stages' state pools). Snapshots are taken at
block boundaries, each named by the hash of the block it ends:
- at the prompt's last full block, and every `snapshot_every` tokens before
  it (a multiple of the block size): `cut` ends a prefill chunk there and
  `save_target` gives the chunk a fresh slot, cached once its step completed;
- past the prompt, at every block boundary a chunk ends on (decode: every
  block_size tokens), into one "tail" slot the sequence holds and overwrites,
  cached when the sequence finishes or is preempted: the state after the last
  full block of its tokens, where the next turn of a chat resumes.
A hybrid sequence then reuses the longest run of cached blocks whose last
block has a snapshot. Knows nothing of devices or tensors.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from dataclasses import dataclass, field
from typing import Protocol

from ..config import ModelConfig
from .blocks import BlockManager, SnapshotCache

log = logging.getLogger("pprt")
_DIGEST_BYTES = 16


class Sequence(Protocol):
    """What the prefix cache reads and keeps on a sequence (the scheduler's Sequence)."""

    seq_id: int
    prompt_ids: list[int]
    cache_key: bytes  # besides the tokens, what decides its KV (a LoRA adapter's load; b"": nothing)
    block_hashes: list[bytes]  # hashes of its first full blocks, grown by PrefixCache.hashes
    blocks_registered: int  # blocks of its table in the cache (registered by it, or reused)
    tail_snapshot: int  # hybrid models: its tail slot (-1: none)
    tail_blocks: int  # full blocks whose state the tail slot holds (0: nothing valid)

    @property
    def num_tokens(self) -> int: ...

    def token_slice(self, lo: int, hi: int) -> list[int]: ...


def cache_salt(*parts: object) -> bytes:
    """The root of every hash chain: a digest of `parts` (reprs of what decides the KV besides the tokens)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=_DIGEST_BYTES).digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: BLAKE2b-128 of the parent's hash and the block's ids as int64 little-endian."""
    ids = array("q", token_ids)
    if sys.byteorder != "little":
        ids.byteswap()
    return hashlib.blake2b(parent + ids.tobytes(), digest_size=_DIGEST_BYTES).digest()


@dataclass(frozen=True, slots=True)
class Reuse:
    """What a sequence takes from the cache: blocks starting its table, and (hybrid models) the
    snapshot of the state after them (-1: none)."""

    blocks: list[int] = field(default_factory=list)
    snapshot: int = -1


class PrefixCache:
    """Hash chains over sequences' full blocks and the reuse decision (see the module docstring).

    snapshots: the state snapshots of a hybrid model (None: the model has no recurrent state).
    snapshot_every: tokens between snapshots inside a long prompt (a multiple of block_size).
    lookahead: tokens after a block its hash covers besides its own (1 with MTP drafting, else 0).
    """

    def __init__(self, block_size: int, salt: bytes, snapshots: SnapshotCache | None = None,
                 snapshot_every: int | None = None, lookahead: int = 0):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if lookahead not in (0, 1):
            raise ValueError(f"lookahead must be 0 or 1 (tokens after a block its hash covers), got {lookahead}")
        self.lookahead = lookahead
        every = snapshot_every or block_size
        if every <= 0 or every % block_size:
            raise ValueError(f"snapshot_every must be a positive multiple of block_size {block_size}, got {every}")
        self.block_size, self.salt, self.snapshots, self.snapshot_every = block_size, salt, snapshots, every

    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, grown to cover at least its first `num_blocks` full blocks (each hash
        is computed once: a sequence's tokens never change, they only grow)."""
        bs, chain, ahead = self.block_size, seq.block_hashes, self.lookahead
        if num_blocks * bs + ahead > seq.num_tokens:
            raise ValueError(f"sequence {seq.seq_id} has {seq.num_tokens} tokens, not {num_blocks} full blocks"
                             + (f" and {ahead} more" if ahead else ""))
        root = cache_salt(self.salt, seq.cache_key) if seq.cache_key else self.salt
        while len(chain) < num_blocks:
            i = len(chain)
            chain.append(block_hash(chain[-1] if chain else root, seq.token_slice(i * bs, (i + 1) * bs + ahead)))
        return chain

    def reusable(self, seq: Sequence, blocks: BlockManager) -> Reuse:
        """What `seq` (which holds no blocks) takes from the cache: the cached blocks of its longest
        reusable prefix (full blocks only, and never its last token, which must be computed to
        sample from), for a hybrid model only as far as a snapshot of the state reaches."""
        limit = (seq.num_tokens - max(1, self.lookahead)) // self.block_size
        hashes = self.hashes(seq, limit)[:limit]
        found = blocks.match(hashes)
        if self.snapshots is None:
            return Reuse(found)
        for k in range(len(found), 0, -1):
            if self.snapshots.has(hashes[k - 1]):
                return Reuse(found[:k], self.snapshots.find(hashes[k - 1]))
        return Reuse()

    # ---- snapshots (hybrid models) -----------------------------------------------------------
    def _last_prompt_block(self, seq: Sequence) -> int:
        """Tokens up to the prompt's last full block that a later request could reuse."""
        return (len(seq.prompt_ids) - 1) // self.block_size * self.block_size

    def cut(self, seq: Sequence, start: int, end: int) -> int:
        """Where a chunk of `seq` over [start, end) ends: `end`, or before it the first snapshot
        point of the prompt after `start` (hybrid models)."""
        if self.snapshots is None:
            return end
        last = self._last_prompt_block(seq)
        point = min((start // self.snapshot_every + 1) * self.snapshot_every, last)
        return point if start < point < end else end

    def save_target(self, seq: Sequence, end: int) -> int:
        """The snapshot slot a chunk of `seq` ending at `end` saves the state into, or -1 (hybrid
        models): a fresh slot at a snapshot point of the prompt not cached yet, the sequence's
        tail slot at a block boundary past the prompt's last full block."""
        if self.snapshots is None or end % self.block_size or end == 0:
            return -1
        last = self._last_prompt_block(seq)
        if end > last:
            if seq.tail_snapshot < 0:
                slot = self.snapshots.take()
                seq.tail_snapshot = -1 if slot is None else slot
            return seq.tail_snapshot
        if end != last and end % self.snapshot_every:
            return -1
        if self.snapshots.has(self.hashes(seq, end // self.block_size)[end // self.block_size - 1]):
            return -1
        slot = self.snapshots.take()
        return -1 if slot is None else slot

    def saved(self, seq: Sequence, slot: int, end: int) -> None:
        """The step that saved `seq`'s state after `end` tokens into `slot` completed on every stage."""
        if slot == seq.tail_snapshot:
            seq.tail_blocks = end // self.block_size
        else:
            self.snapshots.commit(slot, seq.block_hashes[end // self.block_size - 1])

    def unsaved(self, seq: Sequence, slot: int) -> None:
        """The step that was to save into `slot` was undone: what the slot holds is unknown."""
        if slot == seq.tail_snapshot:
            seq.tail_blocks = 0
        else:
            self.snapshots.drop(slot)

    def release_tail(self, seq: Sequence) -> None:
        """`seq` gives its blocks back (finished or preempted): its tail becomes a cached snapshot
        (of the state after its last full block saved), or goes back."""
        slot, seq.tail_snapshot = seq.tail_snapshot, -1
        if slot < 0:
            return
        n = seq.tail_blocks
        if n > 0 and n * self.block_size + self.lookahead <= seq.num_tokens:  # (its name needs the next token)
            self.snapshots.commit(slot, self.hashes(seq, n)[n - 1])
        else:
            self.snapshots.drop(slot)
        seq.tail_blocks = 0

    def register(self, seq: Sequence, table: list[int], num_tokens: int, blocks: BlockManager) -> None:
        """Register the blocks of `table` that `seq`'s first `num_tokens` tokens fill (scheduled now),
        those whose next `lookahead` tokens are known."""
        full = min(num_tokens, seq.num_tokens - self.lookahead) // self.block_size
        if full <= seq.blocks_registered:
            return
        hashes = self.hashes(seq, full)
        for i in range(seq.blocks_registered, full):
            blocks.register(table[i], hashes[i])
        seq.blocks_registered = full


def prefix_cache_for(config: ModelConfig, *, enabled: bool, block_size: int, salt: bytes,
                     snapshots: SnapshotCache | None = None, snapshot_every: int | None = None,
                     lookahead: int = 0) -> PrefixCache | None:
    """The prefix cache an LLM of `config` uses: None when disabled, or for a hybrid model without
    snapshot slots (said in a log line)."""
    if not enabled:
        return None
    if config.hybrid and not (snapshots is not None and snapshots.num_snapshots):
        log.info("prefix caching is off for this %s model: its DeltaNet layers' state cannot be resumed from "
                 "cached KV blocks without state snapshots, and the state pool holds none", config.model_type)
        return None
    return PrefixCache(block_size, salt, snapshots if config.hybrid else None, snapshot_every, lookahead)
