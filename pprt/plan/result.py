"""The planner's typed answers: a device's budget, what each stage holds, and the plan.

Plain data (validated on creation); pprt.plan computes them, the CLI and the
executors read them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    num_snapshots: int = 0  # more state slots every stage allocates for prefix-cache snapshots

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
        """How many sequences of max_context tokens the pools hold at once (KV blocks, and for
        hybrid models state slots)."""
        by_kv = self.num_blocks // -(-self.max_context // self.block_size)
        # speculation on a hybrid plans a snapshot slot beside each running one: at most max_num_seqs run
        return min(by_kv, self.num_slots, self.max_num_seqs) if self.num_slots else by_kv

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
            "num_slots": self.num_slots, "max_num_seqs": self.max_num_seqs, "num_snapshots": self.num_snapshots,
            "quant": self.quant, "kv_dtype": self.kv_dtype, "block_size": self.block_size,
            "num_blocks": self.num_blocks, "kv_tokens": self.kv_tokens,
            "max_context": self.max_context, "context_limit": self.context_limit,
            "longest_sequence": self.longest_sequence, "num_sequences": self.num_sequences,
            "message": self.message,
        }
