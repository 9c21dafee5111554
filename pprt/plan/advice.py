"""What the planner says: the verdict, and when a plan does not fit, by how much and what would help.

Every suggested fix (Int4, fp8 KV, a shorter context, no forced split, more
devices) is tried for real with the planner's own search; none that would not
fit is offered.
"""

from __future__ import annotations

from ..config import ModelConfig
from .cut import _bounds, _Costs, _greedy
from .result import DeviceBudget, Plan
from .sizes import kv_element_bytes

GiB = 1 << 30
MiB = 1 << 20


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
    text = (f"fits: layers {result.split} over {len(result.stages)} device(s); KV pool {result.kv_tokens:,} tokens "
            f"= {result.num_sequences} sequence(s) of {result.max_context:,}")
    per_seq = max(s.state_bytes_per_seq for s in result.stages)
    if per_seq:
        text += (f"; recurrent state {per_seq / MiB:,.1f} MiB per sequence on the fullest stage, "
                 f"{result.num_slots} slot(s)")
        if result.num_snapshots:
            text += f" and {result.num_snapshots} for prefix-cache state snapshots"
        if result.num_slots < result.max_num_seqs:
            text += (f"\nmax_num_seqs {result.max_num_seqs} is bounded by recurrent-state memory: at most "
                     f"{result.num_slots} sequence(s) run at once")
    return text


def _feasible(config: ModelConfig, budgets: list[DeviceBudget], args: dict, **changes) -> bool:
    """Whether some cut (or the given split) fits with `changes` applied to the plan arguments."""
    a = {**args, **changes}
    costs = _Costs(config, budgets, [1.0] * len(budgets), a["quant"], a["group_size"], a["dtype_bytes"],
                   a["kv_dtype"], a["block_size"], a["max_context"],
                   a["chunk_size"], a["overhead_bytes"], a["max_num_seqs"], a.get("state_snapshots", 0),
                   tuple(a.get("lora_layer_bytes") or ()))
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
