"""Memory plan and layer split from config.json alone: "will it fit?" before any weight loads.

`plan()` cuts the decoder stack into contiguous stages [lo, hi), one per device
(stage 0 also holds the embedding, the last stage the final norm and the head),
and says what each stage holds. Knows nothing about weights or files beyond
config.json; `python -m pprt.plan` (pprt.entrypoints.plan_cli) is a thin CLI over it.
Modules: sizes.py (exact bytes), cut.py (per-stage costs and the search),
advice.py (the messages and tried fixes), result.py (the typed answers).

Accounting, in bytes (db = model dtype bytes, T = chunk_size, H, n, m, h, I, V,
E, k = experts per token, as in QWEN.md):
- weights, KV per token and recurrent state per sequence, exact: pprt.plan.sizes
  (every tensor of QWEN.md sections 2 and 7, each linear in the format the loader
  will hold it in: the checkpoint's quantization_config module by module, else
  quantize-at-load; Int4 K*N/2 + ceil(K/g)*N*(db + 1), FP8 N*K + block scales).
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
    + Int4 / FP8: N*K*db of its largest     dequantized for large-M matmuls
      quantized linear
    + last stage: 2*T*V*4                   fp32 logits and probabilities of T rows
    + CUDA graphs (`cuda_graphs`): the buffers above for a decode step of B = max_num_seqs rows
      (B*db*(4H + 2(n*g + m)h), the MLP and DeltaNet terms at B rows, B*V*4 logits on the last
      stage) in the graphs' own pool, B block-table rows of ceil(C / block) int32, one scratch
      KV block and one scratch state slot
  Attention scores are not counted (a flash-style kernel on GPU).
- Every stage holds the same number of KV blocks (block ids are global), so the
  pool is the smallest stage capacity. A plan fits when every stage holds
  weights + reserve + the blocks of one max_context sequence + one sequence's state.
- Hybrid models: every stage also holds the same number of state slots (one per
  running sequence; slot ids are global). State comes first: slots =
  min(max_num_seqs, what every stage holds after weights, reserve and the KV of one
  max_context sequence); the KV pool gets the rest. When memory bounds the slots
  below max_num_seqs, the message says so (the engine runs at most that many
  sequences at once). With prefix caching, `state_snapshots` more slots come
  next (as many as fit beside the running slots and one max_context
  sequence's KV and in at most half the memory the running slots leave, at
  most those wanted): the snapshots of the state the cache resumes from; the
  KV pool gets the rest.
- MTP drafting (`mtp_tokens` = k > 0): the last stage also holds the MTP head
  (pprt.plan.sizes.mtp_weight_bytes), the embedding the head reads (V*H, unless
  that stage is stage 0 or its tied head already is a copy of it) and the head's
  KV (one more full-attention layer per token); its reserve adds the head's fc
  input T*2H*db and its layer's MLP buffers; it reads the head and the lm_head k
  more times per decode step; it runs without CUDA graphs.

The cut minimizes the slowest stage's time per decoded token, bytes read / speed,
where bytes read = layer weights (+ norm and head on the last stage) + KV of one
max_context sequence + the recurrent state of one sequence read and written back
(2x its bytes); the embedding is a row lookup, so it costs memory but no time.
Among cuts equally fast, the one with the largest KV pool wins. When no cut fits,
the plan shows the cut with the smallest worst shortfall.
"""

from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from .advice import GiB, MiB, _beyond_limit, _describe, _explain
from .cut import _bounds, _check_split, _Costs, _cut
from .result import DEFAULT_MAX_NUM_SEQS, DeviceBudget, Plan, StagePlan
from .sizes import (
    FP8_SCALE_BYTES,
    KV_ELEMENT_BYTES,
    QUANTS,
    context_limit,
    embedding_bytes,
    head_bytes,
    int4_linear_bytes,
    kv_bytes_per_token,
    kv_element_bytes,
    layer_weight_bytes,
    mtp_weight_bytes,
    state_bytes_per_sequence,
    weight_formats,
)

__all__ = ["DeviceBudget", "StagePlan", "Plan", "plan", "GiB", "MiB", "QUANTS", "KV_ELEMENT_BYTES",
           "FP8_SCALE_BYTES", "context_limit", "embedding_bytes", "head_bytes", "int4_linear_bytes",
           "kv_bytes_per_token", "kv_element_bytes", "layer_weight_bytes", "mtp_weight_bytes",
           "state_bytes_per_sequence"]

DEFAULT_OVERHEAD = 1 * GiB


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
    state_snapshots: int = 0,
    lora_layer_bytes: list[int] | None = None,
    cuda_graphs: bool = False,
    mtp_tokens: int = 0,
    draft_snapshots: bool = False,
) -> Plan:
    """Cut `config` over `budgets` (one stage per device, in order) and say whether it fits.

    `split` (layers per stage) is validated and checked instead of chosen. `speeds` are relative
    memory bandwidths (equal by default). `max_context` defaults to the model's context limit.
    `max_num_seqs`: sequences the engine may run at once (hybrid models: state slots to hold).
    `state_snapshots`: hybrid models, state slots wanted beside those for the prefix cache's snapshots.
    `lora_layer_bytes`: bytes of LoRA adapter slots per decoder layer (pprt.weights.lora.slot_bytes),
    counted with that layer's weights.
    `cuda_graphs`: the stages capture decode steps up to max_num_seqs rows (their memory is reserved).
    `mtp_tokens`: drafts per step of the model's MTP head (0: off): the last stage then holds the
    head (sizes.mtp_weight_bytes), the embedding (unless it is stage 0 or the head is tied: its copy
    is the embedding) and one more layer of KV, and runs without CUDA graphs.
    `draft_snapshots`: speculative decoding on a hybrid model: every running sequence may hold a
    second state slot (the snapshot its drafts roll back to), so up to 2 x max_num_seqs slots.
    Raises ValueError for bad arguments; a plan that does not fit is returned with fits=False.
    """
    if not budgets:
        raise ValueError("budgets: at least one device is needed")
    for name, value in (("dtype_bytes", dtype_bytes), ("block_size", block_size), ("chunk_size", chunk_size),
                        ("max_num_seqs", max_num_seqs)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if state_snapshots < 0:
        raise ValueError(f"state_snapshots must be >= 0, got {state_snapshots}")
    if mtp_tokens < 0:
        raise ValueError(f"mtp_tokens must be >= 0, got {mtp_tokens}")
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
    lora = tuple(lora_layer_bytes or ())
    if lora and (len(lora) != L or min(lora) < 0):
        raise ValueError(f"lora_layer_bytes needs {L} non-negative entries (one per layer), got {len(lora)}")

    costs = _Costs(config, list(budgets), speeds, quant, group_size, dtype_bytes, kv_dtype,
                   block_size, max_context, chunk_size, overhead_bytes, max_num_seqs, state_snapshots, lora,
                   cuda_graphs, mtp_tokens, draft_snapshots)
    cut, fits = _cut(costs, None if split is None else list(split))
    bounds = _bounds(cut)
    num_blocks, num_slots, num_snapshots = costs.pools(bounds)
    stages = tuple(StagePlan(**costs.stage(s, lo, hi, num_slots + num_snapshots)) for s, (lo, hi) in enumerate(bounds))
    result = Plan(stages, fits, block_size, num_blocks, max_context, limit, eff_quant, kv_dtype, "",
                  num_slots, max_num_seqs, num_snapshots)
    args = dict(quant=quant, kv_dtype=kv_dtype, dtype_bytes=dtype_bytes, block_size=block_size,
                max_context=max_context, chunk_size=chunk_size, split=split, group_size=group_size,
                overhead_bytes=overhead_bytes, speeds=speeds, max_num_seqs=max_num_seqs,
                state_snapshots=state_snapshots, lora_layer_bytes=lora_layer_bytes, cuda_graphs=cuda_graphs,
                mtp_tokens=mtp_tokens, draft_snapshots=draft_snapshots)
    message = _describe(result) if fits else _explain(result, costs, config, budgets, args, suggest)
    if max_context > limit:
        message += "\n" + _beyond_limit(config, max_context, limit)
    return dataclasses.replace(result, message=message)
