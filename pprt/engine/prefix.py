"""Prefix caching's key and its reuse decision: which full KV blocks a sequence takes from the cache.

A full block is named by a hash chained over its parent block's hash and its
token ids; the chain's root is a salt naming everything else that decides the
KV (the rope settings, the dtypes, the quantization; a LoRA adapter id would
join it per request). Two sequences whose first k blocks hold the same tokens
under the same salt share those k hashes, so blocks computed for one serve
the other. The digest is BLAKE2b-128 (hashlib) of the parent digest and the
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

Models with recurrent state (the hybrid Gated DeltaNet families) cannot
resume from KV blocks alone: their state would need a snapshot at the last
reused block, which is not built yet, so `prefix_cache_for` turns caching off
for them (with a log line). Knows nothing of devices or tensors.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from typing import Protocol

from ..config import ModelConfig
from .blocks import BlockManager

log = logging.getLogger("pprt")
_DIGEST_BYTES = 16


class Sequence(Protocol):
    """What the prefix cache reads and keeps on a sequence (the scheduler's Sequence)."""

    seq_id: int
    block_hashes: list[bytes]  # hashes of its first full blocks, grown by PrefixCache.hashes
    blocks_registered: int  # blocks of its table in the cache (registered by it, or reused)

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


class PrefixCache:
    """Hash chains over sequences' full blocks and the reuse decision (see the module docstring)."""

    def __init__(self, block_size: int, salt: bytes):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size, self.salt = block_size, salt

    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, grown to cover at least its first `num_blocks` full blocks (each hash
        is computed once: a sequence's tokens never change, they only grow)."""
        bs, chain = self.block_size, seq.block_hashes
        if num_blocks * bs > seq.num_tokens:
            raise ValueError(f"sequence {seq.seq_id} has {seq.num_tokens} tokens, not {num_blocks} full blocks")
        while len(chain) < num_blocks:
            i = len(chain)
            chain.append(block_hash(chain[-1] if chain else self.salt, seq.token_slice(i * bs, (i + 1) * bs)))
        return chain

    def reusable(self, seq: Sequence, blocks: BlockManager) -> list[int]:
        """Cached blocks holding the longest reusable prefix of `seq` (which holds no blocks): full
        blocks only, and never its last token, which must be computed to sample from."""
        limit = (seq.num_tokens - 1) // self.block_size
        return blocks.match(self.hashes(seq, limit)[:limit])

    def register(self, seq: Sequence, table: list[int], num_tokens: int, blocks: BlockManager) -> None:
        """Register the blocks of `table` that `seq`'s first `num_tokens` tokens fill (scheduled now)."""
        full = num_tokens // self.block_size
        if full <= seq.blocks_registered:
            return
        hashes = self.hashes(seq, full)
        for i in range(seq.blocks_registered, full):
            blocks.register(table[i], hashes[i])
        seq.blocks_registered = full


def prefix_cache_for(config: ModelConfig, *, enabled: bool, block_size: int, salt: bytes) -> PrefixCache | None:
    """The prefix cache an LLM of `config` uses: None when disabled, or when the model keeps
    recurrent state (a hybrid family; said in a log line)."""
    if not enabled:
        return None
    if config.hybrid:
        log.info("prefix caching is off for this %s model: its DeltaNet layers' state cannot be resumed from "
                 "cached KV blocks (state snapshots are not implemented yet)", config.model_type)
        return None
    return PrefixCache(block_size, salt)
