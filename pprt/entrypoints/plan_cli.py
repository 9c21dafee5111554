"""python -m pprt.plan: "will it fit?" from config.json alone, before any weight loads.

A thin CLI over `pprt.plan.plan()`: `--model` (a directory, or a hub id of
which only config.json is fetched), `--gpus 96,96` (GiB per device) or
`--gpus auto` (free memory of the visible GPUs), `--quant`, `--kv-dtype`,
`--max-context`, `--rope-scaling JSON`, `--speculative-mtp K` (MTP drafting's memory), `--json`.
Exit code 0 when it fits, 1 when it does not, 2 on bad arguments or an unreadable model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fields import read_json
from ..plan import QUANTS, DeviceBudget, GiB, Plan, plan
from ..plan.advice import _gib
from ..weights.checkpoint import ModelSource


def read_model_config(model: str) -> ModelConfig:
    """config.json of a local directory or of a hub id (that file only: no weights, no tokenizer)."""
    path = ModelSource(model).require("config.json")
    return ModelConfig.from_dict(read_json(path), path=str(path))


def visible_budgets() -> list[DeviceBudget]:
    """Free memory of every visible CUDA device."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise ValueError("--gpus auto: no CUDA device is visible; give sizes in GiB, e.g. --gpus 96,96")
    return [DeviceBudget(f"cuda:{i}", torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def parse_gpus(text: str) -> list[DeviceBudget]:
    """'96,96' (GiB per device, decimals allowed) or 'auto'."""
    if text.strip() == "auto":
        return visible_budgets()
    budgets = []
    for i, part in enumerate(text.split(",")):
        try:
            gib = float(part)
        except ValueError:
            raise ValueError(f"--gpus {text!r}: {part!r} is not a size in GiB (e.g. --gpus 96,96)") from None
        if not math.isfinite(gib) or gib <= 0:
            raise ValueError(f"--gpus {text!r}: sizes must be positive GiB, got {part!r}")
        budgets.append(DeviceBudget(f"cuda:{i}", int(gib * GiB)))
    return budgets


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--split {text!r} is not a comma-separated list of layer counts") from None


def format_table(result: Plan) -> str:
    hybrid = any(st.state_bytes_per_seq for st in result.stages)
    rows = [("stage", "device", "layers", "weights", "reserve", "KV B/token", "KV tokens", "budget")
            + (("state MiB/seq",) if hybrid else ())]
    for s, st in enumerate(result.stages):
        rows.append((str(s), st.device, f"[{st.layers[0]}, {st.layers[1]})", _gib(st.weight_bytes),
                     _gib(st.reserve_bytes), f"{st.kv_bytes_per_token:,}", f"{st.kv_tokens:,}", _gib(st.budget_bytes))
                    + ((f"{st.state_bytes_per_seq / 2**20:,.1f}",) if hybrid else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    bound = "the model's limit" if result.context_limit < result.kv_tokens else "memory"
    lines += [
        f"KV pool: {result.num_blocks:,} blocks of {result.block_size} = {result.kv_tokens:,} tokens on every stage",
        f"largest context for one sequence: {result.longest_sequence:,} tokens (bound by {bound}; "
        f"model limit {result.context_limit:,})",
        f"sequences of {result.max_context:,} tokens at once: {result.num_sequences}",
    ]
    if hybrid:
        bound = " (bounded by recurrent-state memory)" if result.num_slots < result.max_num_seqs else ""
        lines.append(f"recurrent-state slots on every stage: {result.num_slots} of max_num_seqs "
                     f"{result.max_num_seqs}{bound}")
    lines += [
        f"verdict: {'fits' if result.fits else 'DOES NOT FIT'} "
        f"(weights {'unquantized' if result.quant == 'none' else result.quant}, KV {result.kv_dtype})",
        result.message,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the plan fits, 1 when it does not, 2 on bad arguments (including an unreadable
    model, a bad --gpus string, or --gpus auto without CUDA)."""
    p = argparse.ArgumentParser(prog="python -m pprt.plan", description="Will this Qwen model fit these GPUs?")
    p.add_argument("--model", required=True, help="local directory with config.json, or a hub id")
    p.add_argument("--gpus", default="auto", help="GiB per device, e.g. 96,96; 'auto' = free memory of visible GPUs")
    p.add_argument("--quant", choices=QUANTS, default="none")
    p.add_argument("--kv-dtype", choices=("auto", "bf16", "fp8"), default="auto")
    p.add_argument("--max-context", type=int, default=None, help="tokens of one sequence (default: the model's limit)")
    p.add_argument("--rope-scaling", default=None, metavar="JSON",
                   help="rope scaling instead of the checkpoint's (config.json's spelling), as python -m pprt.generate")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="weights dtype")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--split", default=None, help="layers per stage, e.g. 40,40 (default: the planner's cut)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences at once (hybrid models hold recurrent state for each)")
    p.add_argument("--speculative-mtp", type=int, default=0, metavar="K",
                   help="count MTP drafting with K drafts per step: the head, its KV and the embedding on the last stage")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    try:
        budgets = parse_gpus(args.gpus)
        config = read_model_config(args.model)
        if args.rope_scaling is not None:
            config = config.with_rope_scaling(json.loads(args.rope_scaling))
        result = plan(config, budgets, quant=args.quant, kv_dtype=args.kv_dtype,
                      dtype_bytes={"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype],
                      block_size=args.block_size, max_context=args.max_context, chunk_size=args.chunk_size,
                      split=None if args.split is None else _int_list(args.split), max_num_seqs=args.max_num_seqs,
                      mtp_tokens=args.speculative_mtp, draft_snapshots=args.speculative_mtp > 0)
    except (ValueError, OSError, CheckpointError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else format_table(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
