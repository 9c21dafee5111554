"""Memory plan and layer split from config.json alone: "will it fit?" before any weight loads.

`plan()` cuts the decoder stack into contiguous stages [lo, hi), one per device
(stage 0 also holds the embedding, the last stage the final norm and the head),
and says what each stage holds. Knows nothing about weights or files beyond
config.json; `python -m pprt.plan` (pprt.entrypoints.plan_cli) is a thin CLI over it.

Accounting, in bytes (db = model dtype bytes, T = chunk_size, H, n, m, h, I, V,
E, k = experts per token, as in QWEN.md):
- weights, KV per token and recurrent state per sequence, exact: pprt.plan.sizes
  (every tensor of QWEN.md sections 2 and 7; Int4 where a linear's K fits the group).
  A tied head is the embedding: free on a single stage, V*H again on the last
  stage when that is not stage 0. KV counts a stage's full-attention layers only:
  a stage of DeltaNet layers alone has 0 KV bytes per block.
- reserve of a stage (what a forward of T tokens needs besides weights and pools):
      overhead_bytes                        CUDA context, allocator slack, library workspaces
    + T*db*(4H + 2(n*g + m)h)               hidden, residual, normed, received; q (g = 2 gated), k, v, out
    + max over its layers of the MLP buffers: dense 3*T*I*db;
                                            sparse T*k*(3*Imoe + 2H)*db + 4*T*E (fp32 router)
                                            + 3*T*Is*db with a shared expert
    + max over its DeltaNet layers: T*db*(2*(2*conv + 2*Hv*dv + 2*Hv)) projections and conv out,
                                    + 4*T*Hv*(2*dk + 2*dv) fp32 q, k (repeated per value head), v, o
    + 2*C*m*h*db                            K and V of one max_context (C) sequence gathered for prefill
    + Int4: N*K*db of its largest linear    dequantized for large-M matmuls
    + last stage: 2*T*V*4                   fp32 logits and probabilities of T rows
  Attention scores are not counted (a flash-style kernel on GPU).
- Every stage holds the same number of KV blocks (block ids are global), so the
  pool is the smallest stage capacity. A plan fits when every stage holds
  weights + reserve + the blocks of one max_context sequence + one sequence's state.
- Hybrid models: every stage also holds the same number of state slots (one per
  running sequence; slot ids are global). State comes first: slots =
  min(max_num_seqs, what every stage holds after weights, reserve and the KV of one
  max_context sequence); the KV pool gets the rest. When memory bounds the slots
  below max_num_seqs, the message says so (the engine runs at most that many
  sequences at once).

The cut minimizes the slowest stage's time per decoded token, bytes read / speed,
where bytes read = layer weights (+ norm and head on the last stage) + KV of one
max_context sequence + the recurrent state of one sequence read and written back
(2x its bytes); the embedding is a row lookup, so it costs memory but no time.
Among cuts equally fast, the one with the largest KV pool wins. When no cut fits,
the plan shows the cut with the smallest worst shortfall.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ModelConfig
from .sizes import (
    FP8_SCALE_BYTES,
    KV_ELEMENT_BYTES,
    QUANTS,
    _linears,
    context_limit,
    effective_quant,
    embedding_bytes,
    head_bytes,
    int4_linear_bytes,
    kv_bytes_per_token,
    kv_element_bytes,
    layer_weight_bytes,
    state_bytes_per_sequence,
)

__all__ = ["DeviceBudget", "StagePlan", "Plan", "plan", "GiB", "QUANTS", "KV_ELEMENT_BYTES", "FP8_SCALE_BYTES",
           "context_limit", "embedding_bytes", "head_bytes", "int4_linear_bytes", "kv_bytes_per_token",
           "kv_element_bytes", "layer_weight_bytes", "state_bytes_per_sequence"]

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_OVERHEAD = 1 * GiB
DEFAULT_MAX_NUM_SEQS = 256


@dataclass(frozen=True, slots=True)
class DeviceBudget:
    name: str  # "cuda:0", "cpu", ...
    bytes: int  # memory the runtime may use on it

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DeviceBudget.name must not be empty")
        if self.bytes <= 0:
            raise ValueError(f"DeviceBudget {self.name!r}: bytes must be positive, got {self.bytes}")


@dataclass(frozen=True, slots=True)
class StagePlan:
    device: str
    layers: tuple[int, int]  # [lo, hi)
    weight_bytes: int
    kv_bytes_per_token: int
    reserve_bytes: int
    kv_tokens: int  # tokens of KV this device alone could hold (whole blocks); 0 if none
    budget_bytes: int = 0
    read_bytes: int = 0  # bytes read per decoded token at max_context
    state_bytes_per_seq: int = 0  # recurrent state of one sequence on this stage (hybrid models)

    def __post_init__(self) -> None:
        lo, hi = self.layers
        if not 0 <= lo < hi:
            raise ValueError(f"StagePlan {self.device!r}: layers [{lo}, {hi}) is empty or negative")


@dataclass(frozen=True, slots=True)
class Plan:
    stages: tuple[StagePlan, ...]
    fits: bool
    block_size: int
    num_blocks: int  # KV blocks every stage allocates (the smallest stage's capacity)
    max_context: int  # requested length of one sequence
    context_limit: int  # the model's position limit (max_position_embeddings, or yarn's)
    quant: str  # effective weight format: "none" or "int4"
    kv_dtype: str
    message: str
    num_slots: int = 0  # state slots every stage allocates (hybrid models; 0 otherwise)
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # as asked; num_slots may bound it

    @property
    def split(self) -> list[int]:
        return [s.layers[1] - s.layers[0] for s in self.stages]

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def longest_sequence(self) -> int:
        """Largest context one sequence can have: the whole pool, capped by the model's limit."""
        return min(self.kv_tokens, self.context_limit)

    @property
    def num_sequences(self) -> int:
        """How many sequences of max_context tokens the pool holds at once."""
        return self.num_blocks // -(-self.max_context // self.block_size)

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "stages": [
                {"device": s.device, "layers": list(s.layers), "weight_bytes": s.weight_bytes,
                 "kv_bytes_per_token": s.kv_bytes_per_token, "kv_tokens": s.kv_tokens,
                 "reserve_bytes": s.reserve_bytes, "budget_bytes": s.budget_bytes,
                 "state_bytes_per_seq": s.state_bytes_per_seq}
                for s in self.stages
            ],
            "num_slots": self.num_slots, "max_num_seqs": self.max_num_seqs,
            "quant": self.quant, "kv_dtype": self.kv_dtype, "block_size": self.block_size,
            "num_blocks": self.num_blocks, "kv_tokens": self.kv_tokens,
            "max_context": self.max_context, "context_limit": self.context_limit,
            "longest_sequence": self.longest_sequence, "num_sequences": self.num_sequences,
            "message": self.message,
        }


# ---- the planner ---------------------------------------------------------------------------

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

    def __post_init__(self) -> None:
        c, db, T, L = self.config, self.dtype_bytes, self.chunk_size, self.config.num_layers
        layer = [layer_weight_bytes(c, i, self.quant, db, self.group_size) for i in range(L)]
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
            biggest = max(n_out * k_in for n_out, k_in, _ in _linears(c, i))
            dequant.append(biggest * db if self.quant == "int4" else 0)
        self._mlp_max, self._dequant_max = _range_max(mlp), _range_max(dequant)
        self._deltanet_max = _range_max(deltanet)
        self._kv_layer = kv_bytes_per_token(c, 1, self.kv_dtype, db)  # K and V of one token, one layer
        self.seq_blocks = -(-self.max_context // self.block_size)
        H, n, m, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        g = 2 if c.attn_output_gate else 1
        self._fixed = self.overhead + T * db * 4 * H
        self._attention_buffers = T * db * 2 * (n * g + m) * h + 2 * self.max_context * m * h * db

    def weights(self, s: int, lo: int, hi: int) -> int:
        c, db = self.config, self.dtype_bytes
        total = self._prefix[hi] - self._prefix[lo]
        total += embedding_bytes(c, db) if lo == 0 else 0
        total += head_bytes(c, db, shares_embedding_stage=lo == 0) if hi == c.num_layers else 0
        return total

    def kv_per_token(self, lo: int, hi: int) -> int:
        return (self._attention[hi] - self._attention[lo]) * self._kv_layer

    def state_per_seq(self, lo: int, hi: int) -> int:
        return state_bytes_per_sequence(self.config, (lo, hi), self.dtype_bytes)

    def reserve(self, lo: int, hi: int) -> int:
        logits = 2 * self.chunk_size * self.config.vocab_size * 4 if hi == self.config.num_layers else 0
        attention = self._attention_buffers if self._attention[hi] > self._attention[lo] else 0
        return (self._fixed + attention + self._mlp_max[lo][hi] + self._deltanet_max[lo][hi]
                + self._dequant_max[lo][hi] + logits)

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
        return total

    def time(self, s: int, lo: int, hi: int) -> float:
        return self.read_bytes(lo, hi) / self.speeds[s]

    def fits(self, s: int, lo: int, hi: int) -> bool:
        return self.shortfall(s, lo, hi) <= 0

    def stage(self, s: int, lo: int, hi: int, slots: int) -> StagePlan:
        blocks = self.capacity_blocks(s, lo, hi, slots)
        return StagePlan(
            device=self.budgets[s].name, layers=(lo, hi), weight_bytes=self.weights(s, lo, hi),
            kv_bytes_per_token=self.kv_per_token(lo, hi), reserve_bytes=self.reserve(lo, hi),
            kv_tokens=max(0, blocks) * self.block_size if blocks is not None else 0,
            budget_bytes=self.budgets[s].bytes, read_bytes=self.read_bytes(lo, hi),
            state_bytes_per_seq=self.state_per_seq(lo, hi),
        )

    def pools(self, bounds: list[tuple[int, int]]) -> tuple[int, int]:
        """(KV blocks, state slots) every stage of a cut allocates: slots first (at most max_num_seqs),
        then the blocks left on the fullest stage. Without any KV, blocks enough for every slot's
        max_context sequence (they cost nothing)."""
        slot_caps = [c for s, (lo, hi) in enumerate(bounds) if (c := self.capacity_slots(s, lo, hi)) is not None]
        slots = min(slot_caps) if slot_caps else 0
        block_caps = [b for s, (lo, hi) in enumerate(bounds)
                      if (b := self.capacity_blocks(s, lo, hi, slots)) is not None]
        if not block_caps:
            return self.seq_blocks * max(1, slots), slots
        return max(0, min(block_caps)), slots


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


def plan(
    config: ModelConfig,
    budgets: list[DeviceBudget],
    *,
    quant: str = "none",
    kv_dtype: str = "auto",
    dtype_bytes: int = 2,
    block_size: int = 16,
    max_context: int | None = None,
    chunk_size: int = 2048,
    split: list[int] | None = None,
    group_size: int = 128,
    overhead_bytes: int = DEFAULT_OVERHEAD,
    speeds: list[float] | None = None,
    suggest: bool = True,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> Plan:
    """Cut `config` over `budgets` (one stage per device, in order) and say whether it fits.

    `split` (layers per stage) is validated and checked instead of chosen. `speeds` are relative
    memory bandwidths (equal by default). `max_context` defaults to the model's context limit.
    `max_num_seqs`: sequences the engine may run at once (hybrid models: state slots to hold).
    Raises ValueError for bad arguments; a plan that does not fit is returned with fits=False.
    """
    if not budgets:
        raise ValueError("budgets: at least one device is needed")
    for name, value in (("dtype_bytes", dtype_bytes), ("block_size", block_size), ("chunk_size", chunk_size),
                        ("max_num_seqs", max_num_seqs)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    limit = context_limit(config)
    max_context = limit if max_context is None else max_context
    if max_context <= 0:
        raise ValueError(f"max_context must be positive, got {max_context}")
    S, L = len(budgets), config.num_layers
    if S > L:
        raise ValueError(f"{S} devices but only {L} layers: every stage needs at least one layer")
    speeds = [1.0] * S if speeds is None else list(speeds)
    if len(speeds) != S or any(v <= 0 for v in speeds):
        raise ValueError(f"speeds {speeds} must be {S} positive numbers, one per device")
    if split is not None:
        _check_split(list(split), L, S)
    eff_quant, group = effective_quant(config, quant, group_size)
    kv_element_bytes(kv_dtype, dtype_bytes)  # validates

    costs = _Costs(config, list(budgets), speeds, eff_quant, group, dtype_bytes, kv_dtype,
                   block_size, max_context, chunk_size, overhead_bytes, max_num_seqs)
    cut, fits = _cut(costs, None if split is None else list(split))
    bounds = _bounds(cut)
    num_blocks, num_slots = costs.pools(bounds)
    stages = tuple(costs.stage(s, lo, hi, num_slots) for s, (lo, hi) in enumerate(bounds))
    result = Plan(stages, fits, block_size, num_blocks, max_context, limit, eff_quant, kv_dtype, "",
                  num_slots, max_num_seqs)
    args = dict(quant=quant, kv_dtype=kv_dtype, dtype_bytes=dtype_bytes, block_size=block_size,
                max_context=max_context, chunk_size=chunk_size, split=split, group_size=group_size,
                overhead_bytes=overhead_bytes, speeds=speeds, max_num_seqs=max_num_seqs)
    message = _describe(result) if fits else _explain(result, costs, config, budgets, args, suggest)
    if max_context > limit:
        message += (f"\nnote: max_context {max_context:,} is beyond the model's context limit {limit:,} "
                    "(max_position_embeddings, or rope_scaling yarn factor x original length)")
    return dataclasses.replace(result, message=message)


# ---- messages ------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _describe(result: Plan) -> str:
    text = (f"fits: layers {result.split} over {len(result.stages)} device(s); KV pool {result.kv_tokens:,} tokens "
            f"= {result.num_sequences} sequence(s) of {result.max_context:,}")
    per_seq = max(s.state_bytes_per_seq for s in result.stages)
    if per_seq:
        text += (f"; recurrent state {per_seq / MiB:,.1f} MiB per sequence on the fullest stage, "
                 f"{result.num_slots} slot(s)")
        if result.num_slots < result.max_num_seqs:
            text += (f"\nmax_num_seqs {result.max_num_seqs} is bounded by recurrent-state memory: at most "
                     f"{result.num_slots} sequence(s) run at once")
    return text


def _feasible(config: ModelConfig, budgets: list[DeviceBudget], args: dict, **changes) -> bool:
    """Whether some cut (or the given split) fits with `changes` applied to the plan arguments."""
    a = {**args, **changes}
    quant, group = effective_quant(config, a["quant"], a["group_size"])
    costs = _Costs(config, budgets, [1.0] * len(budgets), quant, group, a["dtype_bytes"],
                   a["kv_dtype"], a["block_size"], a["max_context"],
                   a["chunk_size"], a["overhead_bytes"], a["max_num_seqs"])
    if a["split"] is not None:
        return all(costs.fits(s, lo, hi) for s, (lo, hi) in enumerate(_bounds(list(a["split"]))))
    return len(budgets) <= config.num_layers and _greedy(len(budgets), config.num_layers, costs.fits) is not None


def _fixes(result: Plan, config: ModelConfig, budgets: list[DeviceBudget], args: dict) -> list[str]:
    """Changes that would each make the plan fit, tried for real; none that would not."""
    options = []  # (label, changes), smallest first
    if result.quant != "int4":
        options.append(("--quant int4", {"quant": "int4"}))
    if kv_element_bytes(args["kv_dtype"], args["dtype_bytes"]) > 1:
        options.append(("--kv-dtype fp8", {"kv_dtype": "fp8"}))
    if len(options) == 2:
        options.append(("--quant int4 with --kv-dtype fp8", {"quant": "int4", "kv_dtype": "fp8"}))
    fixes = []
    for label, changes in options:
        if not (len(changes) == 2 and fixes) and _feasible(config, budgets, args, **changes):
            fixes.append(label)
    # the longest context that fits, with the fewest other changes
    for label, changes in [("", {})] + options:
        if label in fixes:
            break
        blocks = _longest_blocks(config, budgets, args, changes)
        if blocks:
            tokens = blocks * args["block_size"]
            fixes.append(f"{label + ' with ' if label else ''}--max-context {tokens}")
            break
    if args["split"] is not None and _feasible(config, budgets, args, split=None):
        fixes.append("no --split (the planner's own cut fits)")
    largest = max(budgets, key=lambda b: b.bytes)
    for extra in range(1, 9):
        more = list(budgets) + [DeviceBudget(f"extra{i}", largest.bytes) for i in range(extra)]
        if _feasible(config, more, args, split=None):
            fixes.append(f"{extra} more device{'s' if extra > 1 else ''} of {_gib(largest.bytes)}")
            break
    return fixes


def _longest_blocks(config: ModelConfig, budgets: list[DeviceBudget], args: dict, changes: dict) -> int:
    """Most blocks of one sequence that fit with `changes` (0 if not even one), below the request."""
    lo, hi = 0, -(-args["max_context"] // args["block_size"]) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _feasible(config, budgets, args, max_context=mid * args["block_size"], **changes):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _explain(result: Plan, costs: _Costs, config: ModelConfig, budgets: list[DeviceBudget], args: dict,
             suggest: bool) -> str:
    lines = [f"does not fit: best cut {result.split}"]
    for s, st in enumerate(result.stages):
        lo, hi = st.layers
        short = costs.shortfall(s, lo, hi)
        if short > 0:
            kv = costs.seq_blocks * costs.block_size * st.kv_bytes_per_token
            state = f" + recurrent state {_gib(st.state_bytes_per_seq)}" if st.state_bytes_per_seq else ""
            lines.append(
                f"  {st.device} (layers [{lo}, {hi})) needs {_gib(costs.need(s, lo, hi))} = weights "
                f"{_gib(st.weight_bytes)} + reserve {_gib(st.reserve_bytes)} + KV {_gib(kv)}{state} for one "
                f"{result.max_context:,}-token sequence, but has {_gib(st.budget_bytes)}: short by {_gib(short)}")
    if suggest:
        fixes = _fixes(result, config, budgets, args)
        lines.append("would fit: " + "; ".join(fixes) if fixes else
                     "none of Int4, fp8 KV, a shorter context or up to 8 more devices makes it fit")
    return "\n".join(lines)

