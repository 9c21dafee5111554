"""The planner's search: per-stage costs of a candidate layer range, and the cut that is fastest.

`_Costs` turns pprt.plan.sizes into what stage s would hold on layers [lo, hi)
(weights, reserve, KV per token, state per sequence, capacities, bytes read per
decoded token) from prefix sums and range maxima; `_cut` finds the cut whose
slowest stage is fastest among those that fit, then the roomiest among equals.
The accounting itself is described in pprt.plan's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .result import DEFAULT_MAX_NUM_SEQS, DeviceBudget
from .sizes import (
    _layer_linear_bytes,
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token,
    layer_weight_bytes,
    mtp_weight_bytes,
    state_bytes_per_sequence,
)


@dataclass
class _Costs:
    """Per-stage sizes of a candidate range [lo, hi) on device s, from prefix sums and range maxima."""

    config: ModelConfig
    budgets: list[DeviceBudget]
    speeds: list[float]
    quant: str
    group_size: int
    dtype_bytes: int
    kv_dtype: str
    block_size: int
    max_context: int
    chunk_size: int
    overhead: int
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    snapshots: int = 0  # state slots wanted for prefix-cache snapshots, beside the running ones
    lora_layer_bytes: tuple[int, ...] = ()  # LoRA slot stacks of each decoder layer (empty: none)
    cuda_graphs: bool = False
    mtp_tokens: int = 0  # drafts per step of the MTP head on the last stage (0: off)
    draft_snapshots: bool = False  # speculation on a hybrid: a snapshot slot beside each running one

    def __post_init__(self) -> None:
        c, db, T, L = self.config, self.dtype_bytes, self.chunk_size, self.config.num_layers
        layer = [layer_weight_bytes(c, i, self.quant, db, self.group_size) for i in range(L)]
        for i, extra in enumerate(self.lora_layer_bytes):  # held and read per token like the weights
            layer[i] += extra
        self._prefix = _prefix_sums(layer)
        self._attention = _prefix_sums([0 if c.is_linear(i) else 1 for i in range(L)])  # full-attention layers
        mlp, deltanet, dequant = [], [], []
        for i in range(L):
            if c.is_sparse(i):
                k, E = c.num_experts_per_tok, c.num_experts
                mlp.append(T * k * (3 * c.moe_intermediate_size + 2 * c.hidden_size) * db + 4 * T * E
                           + 3 * T * c.shared_expert_intermediate_size * db)
            else:
                mlp.append(3 * T * c.intermediate_size * db)
            if c.is_linear(i):
                lin = c.linear
                deltanet.append(T * db * 2 * (2 * lin.conv_dim + 2 * lin.value_dim + 2 * lin.num_value_heads)
                                + 4 * T * lin.num_value_heads * (2 * lin.key_head_dim + 2 * lin.value_head_dim))
            else:
                deltanet.append(0)
            dequant.append(_layer_linear_bytes(c, i, self.quant, self.group_size, db)[1] * db)
        self._mlp_max, self._dequant_max = _range_max(mlp), _range_max(dequant)
        # MTP head (last stage): its weights; its fill of T rows needs the fc input [T, 2H] and its
        # layer's MLP buffers (MoE where the model is)
        self._mtp_weights = mtp_weight_bytes(c, self.quant, db, self.group_size) if self.mtp_tokens else 0
        mtp_mlp = (T * c.num_experts_per_tok * (3 * c.moe_intermediate_size + 2 * c.hidden_size) * db
                   + 4 * T * c.num_experts + 3 * T * c.shared_expert_intermediate_size * db if c.num_experts
                   else 3 * T * c.intermediate_size * db)
        self._mtp_mlp, self._mtp_input = mtp_mlp, T * db * 2 * c.hidden_size
        self._deltanet_max = _range_max(deltanet)
        self._kv_layer = kv_bytes_per_token(c, 1, self.kv_dtype, db)  # K and V of one token, one layer
        self.seq_blocks = -(-self.max_context // self.block_size)
        H, n, m, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        g = 2 if c.attn_output_gate else 1
        self._fixed = self.overhead + T * db * 4 * H
        self._attention_buffers = T * db * 2 * (n * g + m) * h + 2 * self.max_context * m * h * db
        # CUDA graphs: a private pool holding one decode step of max_num_seqs rows (the per-token
        # buffers above at B rows; smaller graphs share it), the block tables of B rows, and a
        # scratch KV block and state slot for padded rows
        B = self.max_num_seqs if self.cuda_graphs else 0
        self._graph_fixed = B * db * 4 * H + B * 4 * self.seq_blocks
        self._graph_attention = B * db * 2 * (n * g + m) * h
        self._graph_scale = B / T

    def _mtp(self, hi: int) -> bool:
        """The stage ending at `hi` holds the MTP head (drafting on, last stage)."""
        return self.mtp_tokens > 0 and hi == self.config.num_layers

    def _has_attention(self, lo: int, hi: int) -> bool:
        return self._attention[hi] > self._attention[lo] or self._mtp(hi)

    def _graphs(self, lo: int, hi: int) -> int:
        if not self.cuda_graphs or self._mtp(hi):  # a last stage that drafts with MTP runs eagerly
            return 0
        c = self.config
        rows = self._graph_fixed + (self._graph_attention if self._has_attention(lo, hi) else 0)
        rows += int(self._graph_scale * (self._mlp_max[lo][hi] + self._deltanet_max[lo][hi]))
        rows += self.max_num_seqs * c.vocab_size * 4 if hi == c.num_layers else 0  # fp32 logits of B rows
        pad_block = self.block_size * self.kv_per_token(lo, hi)
        return rows + pad_block + self.state_per_seq(lo, hi)

    def weights(self, s: int, lo: int, hi: int) -> int:
        c, db = self.config, self.dtype_bytes
        total = self._prefix[hi] - self._prefix[lo]
        total += embedding_bytes(c, db) if lo == 0 else 0
        total += head_bytes(c, db, shares_embedding_stage=lo == 0) if hi == c.num_layers else 0
        if self._mtp(hi):  # the head, and the embedding it reads (a tied head's copy is that embedding)
            total += self._mtp_weights + (embedding_bytes(c, db) if lo > 0 and not c.tie_word_embeddings else 0)
        return total

    def kv_per_token(self, lo: int, hi: int) -> int:
        """K and V of one token: the stage's full-attention layers, and the MTP head's layer."""
        return (self._attention[hi] - self._attention[lo] + int(self._mtp(hi))) * self._kv_layer

    def state_per_seq(self, lo: int, hi: int) -> int:
        return state_bytes_per_sequence(self.config, (lo, hi), self.dtype_bytes)

    def reserve(self, lo: int, hi: int) -> int:
        logits = 2 * self.chunk_size * self.config.vocab_size * 4 if hi == self.config.num_layers else 0
        attention = self._attention_buffers if self._has_attention(lo, hi) else 0
        mlp, mtp = self._mlp_max[lo][hi], 0
        if self._mtp(hi):  # the MTP head's fill of T rows: its fc input, and its layer's MLP buffers
            mlp, mtp = max(mlp, self._mtp_mlp), self._mtp_input
        return (self._fixed + attention + mlp + mtp + self._deltanet_max[lo][hi]
                + self._dequant_max[lo][hi] + logits + self._graphs(lo, hi))

    def need(self, s: int, lo: int, hi: int) -> int:
        """Weights + reserve + the KV blocks of one max_context sequence + one sequence's state."""
        kv = self.seq_blocks * self.block_size * self.kv_per_token(lo, hi)
        return self.weights(s, lo, hi) + self.reserve(lo, hi) + kv + self.state_per_seq(lo, hi)

    def shortfall(self, s: int, lo: int, hi: int) -> int:
        return self.need(s, lo, hi) - self.budgets[s].bytes

    def _free(self, s: int, lo: int, hi: int) -> int:
        return self.budgets[s].bytes - self.weights(s, lo, hi) - self.reserve(lo, hi)

    def capacity_slots(self, s: int, lo: int, hi: int) -> int | None:
        """State slots this stage holds beside the KV of one max_context sequence, at most
        max_num_seqs; None when it has no DeltaNet layer."""
        per_seq = self.state_per_seq(lo, hi)
        if not per_seq:
            return None
        kv = self.seq_blocks * self.block_size * self.kv_per_token(lo, hi)
        return max(0, min(self.max_num_seqs, (self._free(s, lo, hi) - kv) // per_seq))

    def capacity_snapshots(self, s: int, lo: int, hi: int, slots: int) -> int | None:
        """Snapshot slots this stage holds beside `slots` running ones and the KV of one max_context
        sequence, in at most half the memory the running slots leave (the KV pool keeps the other
        half), at most the snapshots wanted (the prefix cache's, and with draft snapshots one per
        running slot); None when it has no DeltaNet layer."""
        per_seq = self.state_per_seq(lo, hi)
        if not per_seq:
            return None
        kv = self.seq_blocks * self.block_size * self.kv_per_token(lo, hi)
        left = self._free(s, lo, hi) - slots * per_seq
        wanted = self.snapshots + (slots if self.draft_snapshots else 0)
        return max(0, min(wanted, (left - kv) // per_seq, left // 2 // per_seq))

    def capacity_blocks(self, s: int, lo: int, hi: int, slots: int | None = None) -> int | None:
        """KV blocks this stage holds beside `slots` state slots (default: as many as it holds
        itself); None when it has no full-attention layer (its blocks cost nothing)."""
        per_token = self.kv_per_token(lo, hi)
        if not per_token:
            return None
        if slots is None:
            slots = self.capacity_slots(s, lo, hi) or 0
        free = self._free(s, lo, hi) - slots * self.state_per_seq(lo, hi)
        return free // (per_token * self.block_size)

    def read_bytes(self, lo: int, hi: int) -> int:
        """Bytes a decode step of one max_context sequence reads and writes on [lo, hi)."""
        c, db = self.config, self.dtype_bytes
        total = self._prefix[hi] - self._prefix[lo] + self.kv_per_token(lo, hi) * self.max_context
        total += 2 * self.state_per_seq(lo, hi)  # the recurrent state, read and written back
        if hi == c.num_layers:  # the head is read whole every step, tied or not
            total += embedding_bytes(c, db) + c.hidden_size * db
        if self._mtp(hi):  # each of k draft steps reads the MTP head and the head
            total += self.mtp_tokens * (self._mtp_weights + embedding_bytes(c, db))
        return total

    def time(self, s: int, lo: int, hi: int) -> float:
        return self.read_bytes(lo, hi) / self.speeds[s]

    def fits(self, s: int, lo: int, hi: int) -> bool:
        return self.shortfall(s, lo, hi) <= 0

    def stage(self, s: int, lo: int, hi: int, slots: int) -> dict:
        """The fields of StagePlan for stage s on [lo, hi) beside `slots` state slots."""
        blocks = self.capacity_blocks(s, lo, hi, slots)
        return dict(
            device=self.budgets[s].name, layers=(lo, hi), weight_bytes=self.weights(s, lo, hi),
            kv_bytes_per_token=self.kv_per_token(lo, hi), reserve_bytes=self.reserve(lo, hi),
            kv_tokens=max(0, blocks) * self.block_size if blocks is not None else 0,
            budget_bytes=self.budgets[s].bytes, read_bytes=self.read_bytes(lo, hi),
            state_bytes_per_seq=self.state_per_seq(lo, hi),
        )

    def pools(self, bounds: list[tuple[int, int]]) -> tuple[int, int, int]:
        """(KV blocks, state slots, snapshot slots) every stage of a cut allocates: running slots first
        (at most max_num_seqs), then snapshot slots (at most those wanted, in at most half of what
        the running slots leave), then the blocks left on the fullest stage. With draft snapshots
        (speculation on a hybrid: one per running slot wanted) the snapshot share is split: the
        drafts' part, at most half of it when the prefix cache wants snapshots too, joins the state
        slots (the scheduler's pool; a sequence finding none free decodes without drafts), the rest
        is the prefix cache's. Without any KV, blocks enough for every slot's max_context sequence
        (they cost nothing)."""
        slot_caps = [c for s, (lo, hi) in enumerate(bounds) if (c := self.capacity_slots(s, lo, hi)) is not None]
        running = min(slot_caps) if slot_caps else 0
        snap_caps = [c for s, (lo, hi) in enumerate(bounds)
                     if (c := self.capacity_snapshots(s, lo, hi, running)) is not None]
        snapshots = min(snap_caps) if snap_caps and running else 0
        drafts = min(snapshots // 2 if self.snapshots else snapshots, running) if self.draft_snapshots else 0
        slots, snapshots = running + drafts, snapshots - drafts
        block_caps = [b for s, (lo, hi) in enumerate(bounds)
                      if (b := self.capacity_blocks(s, lo, hi, slots + snapshots)) is not None]
        if not block_caps:
            return self.seq_blocks * max(1, running), slots, snapshots
        return max(0, min(block_caps)), slots, snapshots


def _prefix_sums(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _range_max(values: list[int]) -> list[list[int]]:
    """table[lo][hi] = max(values[lo:hi]) (0 for an empty range)."""
    table = []
    for lo in range(len(values)):
        row, cur = [0] * (len(values) + 1), 0
        for hi in range(lo + 1, len(values) + 1):
            cur = max(cur, values[hi - 1])
            row[hi] = cur
        table.append(row)
    table.append([0] * (len(values) + 1))
    return table


def _ranges(S: int, L: int):
    """Every (stage, lo, hi) a cut of L layers into S non-empty stages can produce."""
    for s in range(S):
        los = [0] if s == 0 else range(s, L - (S - 1 - s))
        for lo in los:
            his = [L] if s == S - 1 else range(lo + 1, L - (S - 2 - s))
            for hi in his:
                yield s, lo, hi


def _greedy(S: int, L: int, allowed) -> list[int] | None:
    """A cut where every stage satisfies `allowed`, or None if there is none.

    `allowed(s, lo, hi)` must stay true when [lo, hi) shrinks; then taking as many layers as
    allowed on each stage in turn (leaving one per later stage) finds a cut whenever one exists.
    """
    split, lo = [], 0
    for s in range(S - 1):
        hi = lo
        while hi < L - (S - 1 - s) and allowed(s, lo, hi + 1):
            hi += 1
        if hi == lo:
            return None
        split.append(hi - lo)
        lo = hi
    return split + [L - lo] if allowed(S - 1, lo, L) else None


def _minimize_max(S: int, L: int, value, allowed=lambda s, lo, hi: True) -> tuple[list[int], float] | None:
    """The allowed cut whose largest stage `value` is smallest (bisection over attained values)."""
    candidates = sorted({value(s, lo, hi) for s, lo, hi in _ranges(S, L)})
    best = None
    left, right = 0, len(candidates) - 1
    while left <= right:
        mid = (left + right) // 2
        bound = candidates[mid]
        split = _greedy(S, L, lambda s, lo, hi: value(s, lo, hi) <= bound and allowed(s, lo, hi))
        if split is None:
            left = mid + 1
        else:
            best, right = (split, bound), mid - 1
    return best


def _bounds(split: list[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for size in split:
        out.append((lo, lo + size))
        lo += size
    return out


def _check_split(split: list[int], num_layers: int, num_devices: int) -> None:
    if len(split) != num_devices:
        raise ValueError(f"split {split} has {len(split)} stages for {num_devices} devices")
    if any(size < 1 for size in split):
        raise ValueError(f"split {split}: every stage needs at least one layer")
    if sum(split) != num_layers:
        raise ValueError(f"split {split} sums to {sum(split)}, the model has num_hidden_layers = {num_layers}")


def _cut(costs: _Costs, split: list[int] | None) -> tuple[list[int], bool]:
    """The chosen cut and whether it fits."""
    S, L = len(costs.budgets), costs.config.num_layers
    if split is not None:
        return split, all(costs.fits(s, lo, hi) for s, (lo, hi) in enumerate(_bounds(split)))
    fastest = _minimize_max(S, L, costs.time, costs.fits)
    if fastest is None:  # nothing fits: show the cut that misses by the least
        return _minimize_max(S, L, costs.shortfall)[0], False
    bound = fastest[1]

    def room(s: int, lo: int, hi: int) -> int:  # a stage without KV never limits the pool
        blocks = costs.capacity_blocks(s, lo, hi)
        return -(blocks if blocks is not None else 1 << 62)

    roomiest = _minimize_max(S, L, room,
                             lambda s, lo, hi: costs.fits(s, lo, hi) and costs.time(s, lo, hi) <= bound)
    return roomiest[0], True
