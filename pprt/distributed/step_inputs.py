"""A step's input tensors on a stage's device: written on the host into one buffer, copied in one go.

`StepInputs` turns a `StepPlan` into what `Stage.forward` reads: the token ids
(first stage), positions, KV slots, query offsets, context lengths, block
tables and the rows whose logits are sampled. Per step the host writes these
fields into one staging buffer and the device receives them in ONE
asynchronous copy (pprt.models.staging): building a step makes the host wait
for nothing.

Block tables stay on the device. Each sequence owns a row of a [rows, columns]
int32 table; a step writes only the entries its plan adds (`SeqChunk.blocks_from`
and `new_blocks`: one index_put) and gathers its sequences' rows (one
index_select). The host keeps each sequence's block ids as well, to compute
slots. A step's host work grows with its tokens and new blocks, never with
the sequences' contexts.

`padded` lays a pure-decode step out for CUDA graphs (graphs.py): fixed fields
sized for the largest captured batch in a static device buffer, the rows past
the real batch pointing at a scratch KV block and a scratch state slot that no
sequence owns (their keys, values and states land there; their outputs are
dropped). Row 0 of the device
table is that padding row. Knows nothing of the model or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.batch import StepBatch
from ..models.staging import Layout, Uploader
from .step import StepPlan

_I64, _I32 = torch.int64, torch.int32
_PAD_ROW = 0  # the device table's row of padding entries (no sequence owns it)


_PAIRS = ("resume", "restore", "keep", "save")  # state copies around a step, in this order (see Worker.execute)


def _layout(T: int, B: int, R: int, U: int, S: int = 0, F: int = 0, pairs: dict[str, int] | None = None,
            lora: int = 0) -> Layout:
    """A step's fields: T tokens of B sequences, R sampled rows, U new table entries, S state slots
    (B, or 0 without a state pool), F state slots to zero, the (source, destination) slot pairs of
    each state copy, and `lora` per-token adapter slots (T, or 0 when no token has one)."""
    fields = [("ids", _I64, T), ("positions", _I64, T), ("slots", _I64, T), ("rows", _I64, B),
              ("logits", _I64, R), ("upd_rows", _I64, U), ("upd_cols", _I64, U), ("fresh", _I64, F)]
    for name in _PAIRS:
        n = (pairs or {}).get(name, 0)
        fields += [(f"{name}_src", _I64, n), (f"{name}_dst", _I64, n)]
    return Layout(fields + [("qsl", _I32, B + 1), ("ctx", _I32, B), ("upd_blocks", _I32, U), ("state", _I32, S),
                            ("lora", _I32, lora)])


@dataclass(slots=True)
class StepTensors:
    """What the stage reads in one step (on its device)."""

    batch: StepBatch
    token_ids: torch.Tensor  # [T] int64 (used by the first stage)
    logits_indices: torch.Tensor  # [R] int64 rows whose logits are sampled (drafts' predecessors too)
    fresh_slots: torch.Tensor  # [F] int64 state slots of chunks starting at position 0 (to zero first)
    # (source, destination) state slots [n] int64 each, copied in this order: before the step,
    # resume (prefix cache: snapshot -> state), restore (speculation: its snapshot -> state), keep
    # (speculation: state -> its snapshot); after it, save (prefix cache: state -> snapshot)
    resume: tuple[torch.Tensor, torch.Tensor]
    restore: tuple[torch.Tensor, torch.Tensor]
    keep: tuple[torch.Tensor, torch.Tensor]
    save: tuple[torch.Tensor, torch.Tensor]
    lora_slots: torch.Tensor | None  # [T] int32 each token's LoRA adapter slot (-1: none); None: no adapter
    table_rows: torch.Tensor | None = None  # [B] int64 each chunk's row of StepInputs.table


@dataclass(slots=True)
class StaticInputs:
    """Fixed device tensors of a padded decode step (CUDA graphs capture their addresses)."""

    layout: Layout
    buf: torch.Tensor  # uint8 [layout.nbytes]
    fields: dict[str, torch.Tensor]  # views of buf
    tables: torch.Tensor  # [max_batch, columns] int32
    max_batch: int
    block_size: int

    def batch(self, size: int) -> StepBatch:
        """The StepBatch of a padded step of `size` rows (every key column may be read)."""
        f = self.fields
        return StepBatch(positions=f["positions"][:size], slot_mapping=f["slots"][:size],
                         block_tables=self.tables[:size], query_start_loc=f["qsl"][:size + 1],
                         context_lens=f["ctx"][:size], max_query_len=1,
                         max_context_len=self.tables.shape[1] * self.block_size,
                         state_indices=f["state"][:size] if f["state"].numel() else None)


@dataclass(slots=True)
class _Seq:
    row: int
    blocks: list[int]


class StepInputs:
    """Step tensors of one stage's sequences (see the module docstring).

    device: the stage's device. block_size: tokens per KV block. columns: block-table
    columns to start with (grown when a sequence needs more). pad_block: the scratch KV
    block padded rows write to (None: no padded steps). state: the stage has a state pool
    (its batches carry each sequence's slot); pad_slot: its scratch slot for padded rows.
    """

    def __init__(self, device: torch.device | str, block_size: int, columns: int, pad_block: int | None = None,
                 state: bool = False, pad_slot: int | None = None):
        self.device, self.block_size, self.pad_block = torch.device(device), block_size, pad_block
        self.state, self.pad_slot = state, pad_slot
        self._seqs: dict[int, _Seq] = {}
        self._free_rows: list[int] = []
        self.table = torch.zeros(0, max(columns, 1), dtype=torch.int32, device=self.device)  # [rows, columns]
        self._grow(rows=8, columns=max(columns, 1))
        self.uploader = Uploader(self.device)

    # ---- sequences ---------------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def forget(self, seq_id: int) -> None:
        """Drop a finished sequence's table (idempotent)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._free_rows.append(seq.row)

    def blocks(self, seq_id: int) -> list[int]:
        """The block ids of `seq_id` as the stage holds them (a copy)."""
        return list(self._seqs[seq_id].blocks)

    def _grow(self, rows: int, columns: int) -> None:
        old = self.table
        rows, columns = max(rows, old.shape[0]), max(columns, old.shape[1])
        if (rows, columns) == tuple(old.shape):
            return
        table = torch.zeros(rows, columns, dtype=torch.int32, device=self.device)
        table[: old.shape[0], : old.shape[1]] = old
        if self.pad_block is not None:
            table[_PAD_ROW] = self.pad_block
        self._free_rows.extend(range(rows - 1, max(old.shape[0], _PAD_ROW + 1) - 1, -1))
        self.table = table

    def _take(self, plan: StepPlan) -> tuple[list[_Seq], list[int], list[int], list[int]]:
        """Apply the plan's table changes on the host: its sequences, and the (row, column, block) entries it adds."""
        seqs, upd_rows, upd_cols, upd_blocks = [], [], [], []
        for c in plan.chunks:
            seq = self._seqs.get(c.seq_id)
            if seq is None:
                if not self._free_rows:
                    self._grow(rows=2 * self.table.shape[0], columns=0)
                seq = self._seqs[c.seq_id] = _Seq(self._free_rows.pop(), [])
            if c.blocks_from > len(seq.blocks):
                raise ValueError(f"sequence {c.seq_id}: its plan keeps {c.blocks_from} blocks, the stage holds "
                                 f"{len(seq.blocks)}")
            del seq.blocks[c.blocks_from:]
            seq.blocks.extend(c.new_blocks)
            n = len(c.new_blocks)
            if n:
                if len(seq.blocks) > self.table.shape[1]:
                    self._grow(rows=0, columns=max(len(seq.blocks), 2 * self.table.shape[1]))
                upd_rows += [seq.row] * n
                upd_cols += range(c.blocks_from, c.blocks_from + n)
                upd_blocks += c.new_blocks
            if (c.end - 1) // self.block_size >= len(seq.blocks):
                raise ValueError(f"sequence {c.seq_id}: positions up to {c.end - 1} need "
                                 f"{(c.end - 1) // self.block_size + 1} blocks, its table has {len(seq.blocks)}")
            seqs.append(seq)
        return seqs, upd_rows, upd_cols, upd_blocks

    def _slots(self, seq: _Seq, start: int, end: int):
        bs = self.block_size
        if end - start == 1:
            return [seq.blocks[start // bs] * bs + start % bs]
        pos = np.arange(start, end)
        first = start // bs
        blocks = np.asarray(seq.blocks[first:(end - 1) // bs + 1], dtype=np.int64)
        return blocks[pos // bs - first] * bs + pos % bs

    def _apply_updates(self, f: dict[str, torch.Tensor], n: int) -> None:
        if n:
            self.table.index_put_((f["upd_rows"][:n], f["upd_cols"][:n]), f["upd_blocks"][:n])

    # ---- a step ----------------------------------------------------------------------------------
    def build(self, plan: StepPlan) -> StepTensors:
        """The step tensors of `plan`, exactly sized."""
        seqs, upd_rows, upd_cols, upd_blocks = self._take(plan)
        chunks = plan.chunks
        T, B, U = plan.num_tokens, len(chunks), len(upd_rows)
        sample = [i for i, c in enumerate(chunks) if c.sample]
        fresh = [c.state_slot for c in chunks if c.start == 0] if self.state else []
        pairs = {"resume": [(c.restore_from, c.state_slot) for c in chunks if c.restore_from >= 0],
                 "restore": [(c.snapshot_slot, c.state_slot) for c in chunks if c.restore_state],
                 "keep": [(c.state_slot, c.snapshot_slot) for c in chunks if c.num_drafts],
                 "save": [(c.state_slot, c.save_to) for c in chunks if c.save_to >= 0]} if self.state else {}
        lora = any(c.lora_slot >= 0 for c in chunks)
        R = sum(chunks[i].num_drafts + 1 for i in sample)
        layout = _layout(T, B, R, U, B if self.state else 0, len(fresh), {k: len(v) for k, v in pairs.items()},
                         T if lora else 0)
        host = self.uploader.host(layout.nbytes)
        a = layout.arrays(host)
        qsl, o = [0], 0
        for c, seq in zip(chunks, seqs):
            n = len(c.token_ids)
            if lora:
                a["lora"][o:o + n] = c.lora_slot
            a["ids"][o:o + n] = c.token_ids
            a["positions"][o:o + n] = range(c.start, c.end) if n > 1 else c.start
            a["slots"][o:o + n] = self._slots(seq, c.start, c.end)
            o += n
            qsl.append(o)
        a["qsl"][:] = qsl
        a["ctx"][:] = [c.end for c in chunks]
        a["rows"][:] = [s.row for s in seqs]
        # the last token's row, and the row of each draft's predecessor
        a["logits"][:] = [r for i in sample for r in range(qsl[i + 1] - 1 - chunks[i].num_drafts, qsl[i + 1])]
        a["upd_rows"][:], a["upd_cols"][:], a["upd_blocks"][:] = upd_rows, upd_cols, upd_blocks
        if self.state:
            a["state"][:] = [c.state_slot for c in chunks]
            a["fresh"][:] = fresh
            for name, found in pairs.items():
                a[f"{name}_src"][:], a[f"{name}_dst"][:] = [p[0] for p in found], [p[1] for p in found]
        f = layout.tensors(self.uploader.upload(host, layout.nbytes))
        self._apply_updates(f, U)
        max_ctx = max(c.end for c in chunks)
        columns = -(-max_ctx // self.block_size)
        tables = self.table[:, :columns].index_select(0, f["rows"])  # [B, columns]
        batch = StepBatch(positions=f["positions"], slot_mapping=f["slots"], block_tables=tables,
                         query_start_loc=f["qsl"], context_lens=f["ctx"],
                         max_query_len=max(len(c.token_ids) for c in chunks), max_context_len=max_ctx,
                         state_indices=f["state"] if self.state else None)
        copies = {name: (f[f"{name}_src"], f[f"{name}_dst"]) for name in _PAIRS}
        return StepTensors(batch, f["ids"], f["logits"], f["fresh"], **copies,
                           lora_slots=f["lora"] if lora else None, table_rows=f["rows"])

    # ---- padded decode steps (CUDA graphs) ------------------------------------------------------
    def static(self, max_batch: int, columns: int) -> StaticInputs:
        """Fixed device tensors for padded decode steps of up to `max_batch` rows whose tables have
        `columns` columns (the longest context in blocks)."""
        if self.pad_block is None or (self.state and self.pad_slot is None):
            raise ValueError("padded steps need a scratch KV block (pad_block) and, with a state pool, a scratch "
                             "state slot (pad_slot)")
        self._grow(rows=0, columns=columns)
        layout = _layout(max_batch, max_batch, 0, max_batch, max_batch if self.state else 0)
        buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=self.device)
        static = StaticInputs(layout, buf, layout.tensors(buf),
                              torch.zeros(max_batch, columns, dtype=torch.int32, device=self.device), max_batch,
                              self.block_size)
        self._pad_rows(static, 0, max_batch)
        return static

    def fits(self, plan: StepPlan, static: StaticInputs) -> bool:
        """True when `plan` is a pure-decode step a padded layout of `static` can hold: no chunk at
        position 0 (a prompt's, whose state is zeroed first), none whose state is copied from or to
        a snapshot around the step."""
        return (len(plan.chunks) <= static.max_batch
                and all(len(c.token_ids) == 1 and c.sample and c.start > 0 and not c.restore_state
                        and c.restore_from < 0 and c.save_to < 0 for c in plan.chunks)
                and sum(len(c.new_blocks) for c in plan.chunks) <= static.max_batch
                and max(c.end for c in plan.chunks) <= static.tables.shape[1] * self.block_size)

    def padded(self, plan: StepPlan, size: int, static: StaticInputs) -> None:
        """Write the decode step `plan` (checked with `fits`) into `static`, padded to `size` rows."""
        seqs, upd_rows, upd_cols, upd_blocks = self._take(plan)
        B, U = len(plan.chunks), len(upd_rows)
        if not B <= size <= static.max_batch:
            raise ValueError(f"a padded step of {size} rows cannot hold {B} sequences (at most {static.max_batch})")
        host = self.uploader.host(static.layout.nbytes)
        a = static.layout.arrays(host)
        self._pad_arrays(a, B, size)
        a["ids"][:B] = [c.token_ids[0] for c in plan.chunks]
        a["positions"][:B] = [c.start for c in plan.chunks]
        a["slots"][:B] = [s.blocks[c.start // self.block_size] * self.block_size + c.start % self.block_size
                          for c, s in zip(plan.chunks, seqs)]
        a["rows"][:B] = [s.row for s in seqs]
        a["ctx"][:B] = [c.end for c in plan.chunks]
        if self.state:
            a["state"][:B] = [c.state_slot for c in plan.chunks]
        a["upd_rows"][:U], a["upd_cols"][:U], a["upd_blocks"][:U] = upd_rows, upd_cols, upd_blocks
        self.uploader.upload(host, static.layout.nbytes, static.buf)
        self._apply_updates(static.fields, U)
        columns = static.tables.shape[1]
        torch.index_select(self.table[:, :columns], 0, static.fields["rows"][:size], out=static.tables[:size])

    def _pad_arrays(self, a: dict[str, np.ndarray], lo: int, hi: int) -> None:
        """Rows [lo, hi) as padding: token 0 at position 0 in the scratch block, one key of context."""
        a["ids"][lo:hi] = 0
        a["positions"][lo:hi] = 0
        a["slots"][lo:hi] = self.pad_block * self.block_size
        a["rows"][lo:hi] = _PAD_ROW
        a["ctx"][lo:hi] = 1
        if self.state:
            a["state"][lo:hi] = self.pad_slot
        a["qsl"][:] = np.arange(a["qsl"].shape[0])  # one token per row

    def _pad_rows(self, static: StaticInputs, lo: int, hi: int) -> None:
        host = torch.zeros(static.layout.nbytes, dtype=torch.uint8)
        self._pad_arrays(static.layout.arrays(host), lo, hi)
        static.buf.copy_(host.to(self.device))
        columns = static.tables.shape[1]
        torch.index_select(self.table[:, :columns], 0, static.fields["rows"], out=static.tables)
