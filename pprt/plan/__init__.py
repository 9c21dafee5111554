"""Memory plan and layer split from config.json alone: "will it fit?" before any weight loads.

`plan()` cuts the decoder stack into contiguous stages [lo, hi), one per device
(stage 0 also holds the embedding, the last stage the final norm and the head),
and says what each stage holds. Knows nothing about weights or files beyond
config.json; `python -m pprt.plan` (pprt.entrypoints.plan_cli) is a thin CLI over it.

Accounting, in bytes (db = model dtype bytes, T = chunk_size, H, n, m, h, I, V,
E, k = experts per token, as in QWEN.md):
- weights, exact: every tensor of QWEN.md section 2. Each q/k/v/o, dense MLP and
  expert linear [N, K] is counted in the format the loader will hold it in
  (`module_format`): the checkpoint's quantization_config module by module (GPTQ
  `dynamic` rules, `modules_to_not_convert`, compressed-tensors groups and
  `ignore`), else quantize-at-load (`quant`). Int4 costs K*N/2 + ceil(K/g)*N*(db + 1)
  (int4 values, scales in the model dtype, uint8 zeros; + 8K with desc_act), FP8
  N*K + ceil(N/bn)*ceil(K/bk)*4 (float32 block scales), float N*K*db (a layer that
  quant="int4" cannot group stays float; see pprt.quantization). Embedding, head,
  norms, q/k norms, biases and routers stay in the model dtype.
  A tied head is the embedding: free on a single stage, V*H again on the last
  stage when that is not stage 0.
- KV per token: 2 * layers * m * (h * element bytes + s) (auto = model dtype;
  fp8: 1 byte and s = 4, the float32 scale per (slot, kv head) of paged_attention;
  s = 0 otherwise).
- reserve of a stage (what a forward of T tokens needs besides weights and cache):
      overhead_bytes                        CUDA context, allocator slack, library workspaces
    + T*db*(4H + 2(n + m)h)                 hidden, residual, normed, received; q, k, v, attention out
    + max over its layers of the MLP buffers: dense 3*T*I*db;
                                            sparse T*k*(3*Imoe + 2H)*db + 4*T*E (fp32 router)
    + 2*C*m*h*db                            K and V of one max_context (C) sequence gathered for prefill
    + Int4 / FP8: N*K*db of its largest     dequantized for large-M matmuls
      quantized linear
    + last stage: 2*T*V*4                   fp32 logits and probabilities of T rows
  Attention scores are not counted (a flash-style kernel on GPU).
- Every stage holds the same number of KV blocks (block ids are global), so the
  pool is the smallest stage capacity. A plan fits when every stage holds
  weights + reserve + the blocks of one max_context sequence.

The cut minimizes the slowest stage's time per decoded token, bytes read / speed,
where bytes read = layer weights (+ norm and head on the last stage) + KV of one
max_context sequence; the embedding is a row lookup, so it costs memory but no
time. Among cuts equally fast, the one with the largest KV pool wins. When no cut
fits, the plan shows the cut with the smallest worst shortfall.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ..config import ModelConfig, default_context
from ..quantization import AT_LOAD, FLOAT, RTN_GROUP_SIZES, Kind, ModuleFormat, at_load_format

GiB = 1 << 30
DEFAULT_OVERHEAD = 1 * GiB
KV_ELEMENT_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4,
                    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
QUANTS = ("none",) + AT_LOAD  # quantize-at-load of a float checkpoint
FP8_SCALE_BYTES = 4  # float32 scale per (slot, kv head) of an fp8 cache


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
    quant: str  # decoder layers' weight formats: "none", "int4", "fp8" or "int4+fp8"
    kv_dtype: str
    message: str

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
                 "reserve_bytes": s.reserve_bytes, "budget_bytes": s.budget_bytes}
                for s in self.stages
            ],
            "quant": self.quant, "kv_dtype": self.kv_dtype, "block_size": self.block_size,
            "num_blocks": self.num_blocks, "kv_tokens": self.kv_tokens,
            "max_context": self.max_context, "context_limit": self.context_limit,
            "longest_sequence": self.longest_sequence, "num_sequences": self.num_sequences,
            "message": self.message,
        }


# ---- exact sizes ---------------------------------------------------------------------------

def _linears(config: ModelConfig, layer: int) -> list[tuple[str, int, int]]:
    """(module name, N out, K in) of every linear of decoder layer `layer` (routers excluded)."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    p = f"model.layers.{layer}."
    out = [(p + "self_attn.q_proj", n * h, H), (p + "self_attn.k_proj", m * h, H), (p + "self_attn.v_proj", m * h, H),
           (p + "self_attn.o_proj", H, n * h)]
    if config.is_sparse(layer):
        I = config.moe_intermediate_size
        mlps = [f"{p}mlp.experts.{e}." for e in range(config.num_experts)]
    else:
        I, mlps = config.intermediate_size, [p + "mlp."]
    for q in mlps:
        out += [(q + "gate_proj", I, H), (q + "up_proj", I, H), (q + "down_proj", H, I)]
    return out


def module_format(config: ModelConfig, name: str, k_in: int, quant: str = "none", group_size: int = 128) -> ModuleFormat:
    """The format linear `name` [*, k_in] is held in, as the loader decides it: the checkpoint's
    quantization_config when there is one (`quant` is not applied to a quantized checkpoint),
    else quantize-at-load (`quant`: "int4" takes group_size, or the largest of 128, 64, 32 that
    divides k_in, or stays float; "fp8" block 128 x 128), else float."""
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not supported ({', '.join(QUANTS)})")
    if config.quant is not None:
        return config.quant.module(name)
    if quant == "none":
        return FLOAT
    if quant == "int4" and group_size != RTN_GROUP_SIZES[0] and k_in % group_size == 0:
        return ModuleFormat(Kind.INT4, "rtn", group_size=group_size, sym=False)
    return at_load_format(quant, k_in)


@functools.lru_cache(maxsize=1 << 14)
def _layer_linear_bytes(config: ModelConfig, layer: int, quant: str, group_size: int,
                        dtype_bytes: int) -> tuple[int, int, frozenset[Kind]]:
    """(bytes of the layer's linears, elements of its largest quantized one, formats used).
    Memoized: a config's layers repeat across the planner's many candidate plans."""
    total, biggest, kinds = 0, 0, set()
    for name, n_out, k_in in _linears(config, layer):
        fmt = module_format(config, name, k_in, quant, group_size)
        total += fmt.nbytes(n_out, k_in, dtype_bytes)
        kinds.add(fmt.kind)
        if fmt.kind is not Kind.FLOAT:
            biggest = max(biggest, n_out * k_in)
    return total, biggest, frozenset(kinds)


def weight_formats(config: ModelConfig, quant: str = "none", group_size: int = 128) -> str:
    """The weight formats of the decoder layers: "none", "int4", "fp8" or "int4+fp8"."""
    kinds = set().union(*(_layer_linear_bytes(config, i, quant, group_size, 2)[2] for i in range(config.num_layers)))
    used = [k.value for k in (Kind.INT4, Kind.FP8) if k in kinds]
    return "+".join(used) or "none"


def int4_linear_bytes(n_out: int, k_in: int, group_size: int = 128, scale_bytes: int = 2) -> int:
    """Internal Int4 format: packed int4 values, scales in the model dtype and uint8 zeros per group."""
    return ModuleFormat(Kind.INT4, group_size=group_size).nbytes(n_out, k_in, scale_bytes)


def layer_weight_bytes(config: ModelConfig, layer: int, quant: str = "none", dtype_bytes: int = 2,
                       group_size: int = 128) -> int:
    """Bytes of decoder layer `layer` as the runtime holds it (each linear in its format)."""
    H, n, m, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    total = _layer_linear_bytes(config, layer, quant, group_size, dtype_bytes)[0]
    plain = 2 * H  # input and post-attention norms
    plain += (n + 2 * m) * h if config.qkv_bias else 0
    plain += 2 * h if config.qk_norm else 0
    plain += config.num_experts * H if config.is_sparse(layer) else 0  # router
    return total + plain * dtype_bytes


def embedding_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    return config.vocab_size * config.hidden_size * dtype_bytes


def head_bytes(config: ModelConfig, dtype_bytes: int = 2, *, shares_embedding_stage: bool = True) -> int:
    """Final norm + lm_head on the last stage. A tied head costs nothing more when the last
    stage also holds the embedding, and a copy of it when it does not."""
    head = 0 if config.tie_word_embeddings and shares_embedding_stage else embedding_bytes(config, dtype_bytes)
    return head + config.hidden_size * dtype_bytes


def kv_element_bytes(kv_dtype: str, dtype_bytes: int = 2) -> int:
    if kv_dtype == "auto":
        return dtype_bytes
    if kv_dtype not in KV_ELEMENT_BYTES:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not supported (auto, {', '.join(KV_ELEMENT_BYTES)})")
    return KV_ELEMENT_BYTES[kv_dtype]


def kv_bytes_per_token(config: ModelConfig, layers: int | tuple[int, int], kv_dtype: str = "auto",
                       dtype_bytes: int = 2) -> int:
    """K and V of one token over `layers` (a count, or a range (lo, hi)); an fp8 cache also keeps
    one float32 scale per (token, kv head) for K and for V (paged_attention's recommended form)."""
    count = layers if isinstance(layers, int) else layers[1] - layers[0]
    elem = kv_element_bytes(kv_dtype, dtype_bytes)
    scale = FP8_SCALE_BYTES if elem == 1 else 0
    return 2 * count * config.num_kv_heads * (config.head_dim * elem + scale)


def context_limit(config: ModelConfig) -> int:
    """The context the model serves by default (`pprt.config.default_context`): its window, or
    its YaRN's, capped where a field pprt does not implement would change the math."""
    return default_context(config)


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

    def __post_init__(self) -> None:
        c, db, T, L = self.config, self.dtype_bytes, self.chunk_size, self.config.num_layers
        layer = [layer_weight_bytes(c, i, self.quant, db, self.group_size) for i in range(L)]
        self._prefix = [0]
        for b in layer:
            self._prefix.append(self._prefix[-1] + b)
        mlp, dequant = [], []
        for i in range(L):
            if c.is_sparse(i):
                k, E = c.num_experts_per_tok, c.num_experts
                mlp.append(T * k * (3 * c.moe_intermediate_size + 2 * c.hidden_size) * db + 4 * T * E)
            else:
                mlp.append(3 * T * c.intermediate_size * db)
            dequant.append(_layer_linear_bytes(c, i, self.quant, self.group_size, db)[1] * db)
        self._mlp_max, self._dequant_max = _range_max(mlp), _range_max(dequant)
        self._kv_layer = kv_bytes_per_token(c, 1, self.kv_dtype, db)  # K and V of one token, one layer
        self.seq_blocks = -(-self.max_context // self.block_size)
        H, n, m, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self._fixed = self.overhead + T * db * (4 * H + 2 * (n + m) * h) + 2 * self.max_context * m * h * db

    def weights(self, s: int, lo: int, hi: int) -> int:
        c, db = self.config, self.dtype_bytes
        total = self._prefix[hi] - self._prefix[lo]
        total += embedding_bytes(c, db) if lo == 0 else 0
        total += head_bytes(c, db, shares_embedding_stage=lo == 0) if hi == c.num_layers else 0
        return total

    def kv_per_token(self, lo: int, hi: int) -> int:
        return (hi - lo) * self._kv_layer

    def reserve(self, lo: int, hi: int) -> int:
        logits = 2 * self.chunk_size * self.config.vocab_size * 4 if hi == self.config.num_layers else 0
        return self._fixed + self._mlp_max[lo][hi] + self._dequant_max[lo][hi] + logits

    def need(self, s: int, lo: int, hi: int) -> int:
        """Weights + reserve + the KV blocks of one max_context sequence."""
        kv = self.seq_blocks * self.block_size * self.kv_per_token(lo, hi)
        return self.weights(s, lo, hi) + self.reserve(lo, hi) + kv

    def shortfall(self, s: int, lo: int, hi: int) -> int:
        return self.need(s, lo, hi) - self.budgets[s].bytes

    def capacity_blocks(self, s: int, lo: int, hi: int) -> int:
        free = self.budgets[s].bytes - self.weights(s, lo, hi) - self.reserve(lo, hi)
        return free // (self.kv_per_token(lo, hi) * self.block_size)

    def read_bytes(self, lo: int, hi: int) -> int:
        c, db = self.config, self.dtype_bytes
        total = self._prefix[hi] - self._prefix[lo] + self.kv_per_token(lo, hi) * self.max_context
        if hi == c.num_layers:  # the head is read whole every step, tied or not
            total += embedding_bytes(c, db) + c.hidden_size * db
        return total

    def time(self, s: int, lo: int, hi: int) -> float:
        return self.read_bytes(lo, hi) / self.speeds[s]

    def fits(self, s: int, lo: int, hi: int) -> bool:
        return self.shortfall(s, lo, hi) <= 0

    def stage(self, s: int, lo: int, hi: int) -> StagePlan:
        return StagePlan(
            device=self.budgets[s].name, layers=(lo, hi), weight_bytes=self.weights(s, lo, hi),
            kv_bytes_per_token=self.kv_per_token(lo, hi), reserve_bytes=self.reserve(lo, hi),
            kv_tokens=max(0, self.capacity_blocks(s, lo, hi)) * self.block_size,
            budget_bytes=self.budgets[s].bytes, read_bytes=self.read_bytes(lo, hi),
        )


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
    roomiest = _minimize_max(S, L, lambda s, lo, hi: -costs.capacity_blocks(s, lo, hi),
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
) -> Plan:
    """Cut `config` over `budgets` (one stage per device, in order) and say whether it fits.

    `split` (layers per stage) is validated and checked instead of chosen. `speeds` are relative
    memory bandwidths (equal by default). `max_context` defaults to the model's context limit.
    Raises ValueError for bad arguments; a plan that does not fit is returned with fits=False.
    """
    if not budgets:
        raise ValueError("budgets: at least one device is needed")
    for name, value in (("dtype_bytes", dtype_bytes), ("block_size", block_size), ("chunk_size", chunk_size)):
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
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not supported ({', '.join(QUANTS)})")
    kv_element_bytes(kv_dtype, dtype_bytes)  # validates
    eff_quant = weight_formats(config, quant, group_size)

    costs = _Costs(config, list(budgets), speeds, quant, group_size, dtype_bytes, kv_dtype,
                   block_size, max_context, chunk_size, overhead_bytes)
    cut, fits = _cut(costs, None if split is None else list(split))
    stages = tuple(costs.stage(s, lo, hi) for s, (lo, hi) in enumerate(_bounds(cut)))
    num_blocks = max(0, min(costs.capacity_blocks(s, lo, hi) for s, (lo, hi) in enumerate(_bounds(cut))))
    result = Plan(stages, fits, block_size, num_blocks, max_context, limit, eff_quant, kv_dtype, "")
    args = dict(quant=quant, kv_dtype=kv_dtype, dtype_bytes=dtype_bytes, block_size=block_size,
                max_context=max_context, chunk_size=chunk_size, split=split, group_size=group_size,
                overhead_bytes=overhead_bytes, speeds=speeds)
    message = _describe(result) if fits else _explain(result, costs, config, budgets, args, suggest)
    if max_context > limit:
        message += "\n" + _beyond_limit(config, max_context, limit)
    return dataclasses.replace(result, message=message)


# ---- messages ------------------------------------------------------------------------------

def _beyond_limit(config: ModelConfig, max_context: int, limit: int) -> str:
    """What serving `max_context` past the model's context means (as `pprt.config.extend_context` does it)."""
    if config.rope.type == "yarn" or config.exact_context:
        return (f"note: max_context {max_context:,} is beyond the {limit:,} tokens this model serves as configured "
                f"({config.exact_context_reason or 'its YaRN factor x original length'}): quality past them "
                "is unknown")
    return (f"note: max_context {max_context:,} is beyond max_position_embeddings {limit:,}: pprt enables YaRN "
            f"(factor {max_context / config.trained_window:.4g} over the trained window "
            f"{config.trained_window:,})")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _describe(result: Plan) -> str:
    return (f"fits: layers {result.split} over {len(result.stages)} device(s); KV pool {result.kv_tokens:,} tokens "
            f"= {result.num_sequences} sequence(s) of {result.max_context:,}")


def _feasible(config: ModelConfig, budgets: list[DeviceBudget], args: dict, **changes) -> bool:
    """Whether some cut (or the given split) fits with `changes` applied to the plan arguments."""
    a = {**args, **changes}
    costs = _Costs(config, budgets, [1.0] * len(budgets), a["quant"], a["group_size"], a["dtype_bytes"],
                   a["kv_dtype"], a["block_size"], a["max_context"],
                   a["chunk_size"], a["overhead_bytes"])
    if a["split"] is not None:
        return all(costs.fits(s, lo, hi) for s, (lo, hi) in enumerate(_bounds(list(a["split"]))))
    return len(budgets) <= config.num_layers and _greedy(len(budgets), config.num_layers, costs.fits) is not None


def _fixes(result: Plan, config: ModelConfig, budgets: list[DeviceBudget], args: dict) -> list[str]:
    """Changes that would each make the plan fit, tried for real; none that would not."""
    options = []  # (label, changes), smallest first; combinations only when no single change fits
    smaller = {"none": ("fp8", "int4"), "fp8": ("int4",), "int4": ()}[args["quant"]]
    if config.quant is None:  # quantize-at-load changes nothing in a quantized checkpoint
        options += [(f"--quant {q}", {"quant": q}) for q in smaller]
    if kv_element_bytes(args["kv_dtype"], args["dtype_bytes"]) > 1:
        options.append(("--kv-dtype fp8", {"kv_dtype": "fp8"}))
        if config.quant is None and "int4" in smaller:
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
            lines.append(
                f"  {st.device} (layers [{lo}, {hi})) needs {_gib(costs.need(s, lo, hi))} = weights "
                f"{_gib(st.weight_bytes)} + reserve {_gib(st.reserve_bytes)} + KV {_gib(kv)} for one "
                f"{result.max_context:,}-token sequence, but has {_gib(st.budget_bytes)}: short by {_gib(short)}")
    if suggest:
        fixes = _fixes(result, config, budgets, args)
        lines.append("would fit: " + "; ".join(fixes) if fixes else
                     "none of Int4, fp8 KV, a shorter context or up to 8 more devices makes it fit")
    return "\n".join(lines)

