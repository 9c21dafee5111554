"""The last stage's MTP drafting: fill the MTP head's KV for a step's positions, then draft.

The MTP head (pprt.models.mtp) reads, at position p, the model's normed hidden
state at p and the token at p + 1, and keeps K and V of its one layer in a
paged pool: one more layer of the last stage's KV pool, under the sequence's
own block ids (same table, same slots), so it is freed, preempted and cached
with the sequence's blocks.

After the last stage sampled a step, `MTPDrafter.run`:
1. fills the head's KV for every chunk of the step, at the positions whose
   next token is now known: a chunk that does not sample, at all its positions
   (the token after its last one comes in the plan: `SeqChunk.next_token`); a
   sampling chunk, at its known positions and its accepted drafts, the last of
   them with the token just sampled after them. Positions of rejected drafts
   are not filled (their KV is overwritten when the positions are computed again).
2. drafts, for each chunk that asks (`SeqChunk.propose` = k): the head's output
   at the last filled position gives draft 1 (argmax of the shared head's logits:
   greedy drafts, a point mass, as pprt.models.speculative's acceptance assumes);
   draft j + 1 runs the head at the next position on its own output and draft j.
   Those positions (from the sampled token's on) hold the head's KV of the
   drafts until the sequence's next step fills them with the real ones; a
   draft needs its position inside the sequence's block table (the scheduler
   reserves k - 1 positions past the chunk), else drafting stops there.

A position's KV then depends on the tokens up to p + 1 only, so the driver's
prefix cache names a block by its tokens and the one after it
(pprt.engine.prefix, `lookahead`): a block another sequence reuses holds the
head's KV of that sequence's tokens. Knows nothing of scheduling.
"""

from __future__ import annotations

import torch

from ..models.batch import StepBatch
from ..models.kv import LayerKV
from ..models.stage import Stage
from .step import StepPlan, StepResult
from .step_inputs import StepInputs, StepTensors


class MTPDrafter:
    """MTP fill and drafting of one last stage. kv: the head's layer of the stage's KV pool."""

    def __init__(self, stage: Stage, kv: LayerKV, inputs: StepInputs):
        if stage.mtp is None:
            raise ValueError("MTP drafting needs a last stage built with its MTP head (Stage(..., mtp=True))")
        self.stage, self.kv, self.inputs = stage, kv, inputs
        self.device = inputs.device

    def _ints(self, values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _head(self, hidden: torch.Tensor, tokens: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The MTP head's output y [T, H] (after mtp.norm) at batch.positions."""
        cos, sin = self.stage.rotary.cos_sin(batch.positions, hidden.dtype)
        return self.stage.mtp(hidden, self.stage.model.embed_tokens(tokens), batch, cos, sin, self.kv)

    @torch.inference_mode()
    def run(self, plan: StepPlan, step: StepTensors, hidden: torch.Tensor, result: StepResult) -> list[list[int]]:
        """Fill, then draft (see the module docstring). hidden: [T, H] the step's rows after the
        final norm. Returns each sampling chunk's drafts, in result order ([] where none was asked)."""
        sampled = {seq_id: j for j, seq_id in enumerate(result.seq_ids)}
        rows, tokens, chunks, qsl, ctx = [], [], [], [0], []
        drafting = []  # (result index, fill batch entry, chunk) of the chunks that ask for drafts
        offset = 0
        for i, c in enumerate(plan.chunks):
            n, last = len(c.token_ids), c.next_token
            if c.sample:
                j = sampled[c.seq_id]
                n -= c.num_drafts - (len(result.accepted[j]) if result.accepted else 0)
                last = result.token_ids[j]
            elif last < 0:
                n -= 1  # the token after the chunk is unknown here: its last position waits
            if n > 0:
                rows += range(offset, offset + n)
                tokens += c.token_ids[1:n] + ([last] if last >= 0 else [])
                if c.sample and c.propose:
                    drafting.append((j, len(chunks), c))  # (result index, fill entry, chunk)
                chunks.append(i)
                qsl.append(len(rows))
                ctx.append(c.start + n)
            offset += len(c.token_ids)
        drafts: list[list[int]] = [[] for _ in result.seq_ids]
        if not rows:
            return drafts
        fill_rows = self._ints(rows)  # [F]
        batch = StepBatch(positions=step.batch.positions[fill_rows], slot_mapping=step.batch.slot_mapping[fill_rows],
                          block_tables=step.batch.block_tables.index_select(0, self._ints(chunks)),
                          query_start_loc=self._ints(qsl, torch.int32), context_lens=self._ints(ctx, torch.int32),
                          max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])), max_context_len=max(ctx))
        y = self._head(hidden[fill_rows], self._ints(tokens), batch)  # [F, H]
        if drafting:
            last = self._ints([qsl[b + 1] - 1 for _, b, _ in drafting])
            found = self._draft([c for _, _, c in drafting], y[last], [ctx[b] for _, b, _ in drafting],
                                step.table_rows.index_select(0, self._ints([chunks[b] for _, b, _ in drafting])))
            for (j, _, _), d in zip(drafting, found):
                drafts[j] = d
        return drafts

    def _draft(self, seqs: list, y: torch.Tensor, base: list[int], table_rows: torch.Tensor) -> list[list[int]]:
        """Greedy drafts of the chunks `seqs`: y [D, H] the head's output at each one's last filled
        position; base[d]: the position of its sampled token, where its second draft runs;
        table_rows [D]: their rows of the stage's block table."""
        bs = self.inputs.block_size
        # extra draft steps each sequence runs: k - 1, as far as its block table reaches
        blocks = [self.inputs.blocks(c.seq_id) for c in seqs]
        steps = [min(c.propose - 1, len(b) * bs - p) for c, b, p in zip(seqs, blocks, base)]
        token = self.stage.logits(y).argmax(dim=-1)  # [D] draft 1
        found = [(list(range(len(seqs))), token)]  # (sequences, their draft) per step
        active = list(range(len(seqs)))  # the rows of y and token
        for s in range(1, max(steps) + 1):
            keep = [d for d in active if steps[d] >= s]
            if len(keep) < len(active):
                sel = self._ints([active.index(d) for d in keep])
                y, token = y[sel], token[sel]
            active = keep
            pos = [base[d] + s - 1 for d in active]
            slots = [blocks[d][p // bs] * bs + p % bs for d, p in zip(active, pos)]
            tables = self.inputs.table[:, :max(pos) // bs + 1].index_select(0, table_rows[self._ints(active)])
            batch = StepBatch(positions=self._ints(pos), slot_mapping=self._ints(slots), block_tables=tables,
                              query_start_loc=torch.arange(len(active) + 1, dtype=torch.int32, device=self.device),
                              context_lens=self._ints([p + 1 for p in pos], torch.int32), max_query_len=1,
                              max_context_len=max(pos) + 1)
            y = self._head(y, token, batch)  # [A, H]: the head's own output is the next step's hidden state
            token = self.stage.logits(y).argmax(dim=-1)  # [A] draft s + 1
            found.append((active, token))
        values = torch.cat([t for _, t in found]).tolist()  # one copy to the host
        out: list[list[int]] = [[] for _ in seqs]
        i = 0
        for who, _ in found:
            for d in who:
                out[d].append(values[i])
                i += 1
        return out
