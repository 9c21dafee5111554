"""The gated delta rule on GPU: an in-place recurrent Triton kernel, and fla's chunked kernel for long rows.

Contract (shapes, math, state slots): pprt_kernels.gated_delta, whose `gated_delta_rule_ref`
is the oracle of this module.

Two kernels, chosen per sequence by `gated_delta_rule_triton`:
- `_recurrent_kernel` (ours): one program per (sequence, value head, block of dv columns)
  reads the [dk, BV] tile of state[state_indices[b], h] once, runs the recurrence over the
  sequence's rows, and writes the tile back to the same slot: the state never leaves the
  pool, so a decode step moves each state once in and once out (the minimum). Serves every
  sequence of a step with max_query_len < CHUNKED_MIN_ROWS (decode, short chunks: no host
  sync) and, in other steps, the sequences shorter than CHUNKED_MIN_ROWS.
- flash-linear-attention's `chunk_gated_delta_rule` (fla-core, MIT, Songlin Yang, Yu Zhang
  et al.; called, not copied) for sequences of CHUNKED_MIN_ROWS rows or more: the chunked
  (WY) algorithm turns the recurrence into matmuls. It takes dense initial states
  [N, Hv, dk, dv] and returns dense final states, so those sequences' states are gathered
  (state[slots]) and scattered back (index_copy_). That costs one extra read and write of
  each such state per call, paid only by prefill chunks, whose own work (CHUNKED_MIN_ROWS
  rows or more of projections) is far larger; decode never pays it. Changing fla's kernels
  to take slot indices would save it but means carrying a modified copy of fla's chunk_h
  kernel; not worth it until a measurement says so.
fla runs only on CUDA tensors: it is imported on first use, and where it is missing (it is
the optional `gpu` extra) or the tensors are not on CUDA (TRITON_INTERPRET runs on CPU;
fla's chunk kernels do not run under the interpreter), every sequence takes the recurrent
kernel: correct, slower for long prompts. fla-core is deliberately not a core dependency:
installed, it also replaces transformers' own torch path in Qwen3-Next (the test oracle),
and fla's kernels fail on CPU tensors.
"""

from __future__ import annotations

import functools
import logging

import torch

from .gated_delta import L2NORM_EPS, _check

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

log = logging.getLogger(__name__)

CHUNKED_MIN_ROWS = 64  # rows from which a sequence takes fla's chunked kernel (one fla chunk)
BLOCK_V = 8  # dv columns per program of the recurrent kernel (as fla's fused_recurrent)

if triton is not None:

    @triton.jit
    def _recurrent_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, s_ptr, idx_ptr, qsl_ptr, seq_ptr, scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
        stride_bt, stride_bh, stride_ot, stride_oh, stride_ss, stride_sh, stride_sk, stride_sv,
        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        L2NORM: tl.constexpr, EPS: tl.constexpr, HAS_SEQ_LIST: tl.constexpr,
    ):
        # grid (dv blocks, sequences x heads); the program owns state[slot, h, :, v0:v0 + BV]
        pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
        h = pid_bh % H
        b = pid_bh // H
        if HAS_SEQ_LIST:  # a subset of the batch's sequences
            b = tl.load(seq_ptr + b)
        bos = tl.load(qsl_ptr + b).to(tl.int64)
        eos = tl.load(qsl_ptr + b + 1).to(tl.int64)
        slot = tl.load(idx_ptr + b).to(tl.int64)
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mask_k, mask_v = offs_k < DK, offs_v < DV
        mask_s = mask_k[:, None] & mask_v[None, :]
        s_ptrs = s_ptr + slot * stride_ss + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv
        s = tl.load(s_ptrs, mask=mask_s, other=0.0).to(tl.float32)  # [BK, BV]
        for t in range(bos, eos):
            q = tl.load(q_ptr + t * stride_qt + h * stride_qh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + t * stride_kt + h * stride_kh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * stride_gt + h * stride_gh).to(tl.float32)
            beta = tl.load(beta_ptr + t * stride_bt + h * stride_bh).to(tl.float32)
            if L2NORM:
                q = q * (1.0 / tl.sqrt(tl.sum(q * q) + EPS))
                k = k * (1.0 / tl.sqrt(tl.sum(k * k) + EPS))
            q = q * scale
            s = s * tl.exp(g)
            u = beta * (v - tl.sum(s * k[:, None], 0))  # [BV]
            s = s + k[:, None] * u[None, :]
            o = tl.sum(s * q[:, None], 0)  # [BV]
            tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)
        tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=mask_s)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _recurrent(q, k, v, g, beta, o, state, state_indices, query_start_loc, seq_list, scale, use_qk_l2norm) -> None:
    """Launch the recurrent kernel over all sequences, or those listed in seq_list (int32 [n])."""
    t, h, dk = q.shape
    dv = v.shape[2]
    n = state_indices.shape[0] if seq_list is None else seq_list.shape[0]
    if n == 0 or t == 0:
        return
    grid = (triton.cdiv(dv, BLOCK_V), n * h)
    _recurrent_kernel[grid](
        q, k, v, g, beta, o, state, state_indices, query_start_loc,
        seq_list if seq_list is not None else state_indices, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1),
        beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        state.stride(0), state.stride(1), state.stride(2), state.stride(3),
        H=h, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=min(BLOCK_V, triton.next_power_of_2(dv)),
        L2NORM=use_qk_l2norm, EPS=L2NORM_EPS, HAS_SEQ_LIST=seq_list is not None,
        num_warps=1,
    )


@functools.cache
def _fla_chunk():
    """fla's chunk_gated_delta_rule, or None (logged once) where fla-core is not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        log.warning("fla-core is not installed (pip install 'pprt[gpu]'): prefill runs the recurrent kernel")
        return None
    return chunk_gated_delta_rule


def _chunked_available(device: torch.device) -> bool:
    """fla's chunked kernel serves long rows: CUDA tensors, fla-core installed."""
    return device.type == "cuda" and _fla_chunk() is not None


def _chunked(q, k, v, g, beta, o, state, slots, qsl_host, long_seqs, scale, use_qk_l2norm) -> None:
    """fla's chunked kernel over the sequences in long_seqs, their states gathered and scattered back."""
    chunk_fn = _fla_chunk()
    bounds = [(qsl_host[b], qsl_host[b + 1]) for b in long_seqs]
    if bounds[-1][1] - bounds[0][0] == sum(e - s for s, e in bounds):  # one contiguous run of rows
        rows = slice(bounds[0][0], bounds[-1][1])
    else:
        rows = torch.cat([torch.arange(s, e, device=q.device) for s, e in bounds])
    cu_host = torch.tensor([0] + [e - s for s, e in bounds]).cumsum(0)
    slot_ids = slots[long_seqs]  # [N] int64 on the device
    out, final = chunk_fn(
        q[rows][None], k[rows][None], v[rows][None], g[rows][None], beta[rows][None],
        scale=scale, initial_state=state.index_select(0, slot_ids).float(), output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_host.to(q.device), cu_seqlens_cpu=cu_host,
    )  # o [1, rows, Hv, dv], final [N, Hv, dk, dv] fp32
    o[rows] = out[0].to(o.dtype)
    state.index_copy_(0, slot_ids, final.to(state.dtype))


def gated_delta_rule_triton(
    q: torch.Tensor,  # [T, Hv, dk]
    k: torch.Tensor,  # [T, Hv, dk]
    v: torch.Tensor,  # [T, Hv, dv]
    g: torch.Tensor,  # [T, Hv] fp32
    beta: torch.Tensor,  # [T, Hv]
    state: torch.Tensor,  # [num_slots, Hv, dk, dv]; updated in place
    state_indices: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    max_query_len: int | None = None,  # host int; 1 = pure decode (no host sync)
) -> torch.Tensor:  # [T, Hv, dv] in v.dtype
    """Launcher: checks, allocates o, runs the recurrent kernel (and fla's chunked one for long rows).

    A step whose max_query_len < CHUNKED_MIN_ROWS (decode: 1) runs the recurrent kernel alone,
    without a host sync. Any other step reads query_start_loc to the host once to pick each
    sequence's kernel. Slots must be distinct
    (not checked here: that would need a sync). Raises ValueError as the reference does.
    Never cached: the result depends on the tensors' contents.
    """
    _check(q, k, v, g, beta, state, state_indices, query_start_loc, max_query_len)
    if triton is None:
        raise RuntimeError("gated_delta_rule: triton is not installed")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # [T, Hv, dv]
    all_short = max_query_len is not None and max_query_len < CHUNKED_MIN_ROWS
    if all_short or not _chunked_available(q.device):
        _recurrent(q, k, v, g, beta, o, state, state_indices, query_start_loc, None, scale, use_qk_l2norm)
        return o
    qsl_host = query_start_loc.tolist()
    lens = [e - s for s, e in zip(qsl_host, qsl_host[1:])]
    long_seqs = [b for b, n in enumerate(lens) if n >= CHUNKED_MIN_ROWS]
    short_seqs = [b for b, n in enumerate(lens) if 0 < n < CHUNKED_MIN_ROWS]
    if short_seqs:
        seq_list = None if not long_seqs else torch.tensor(short_seqs, dtype=torch.int32, device=q.device)
        _recurrent(q, k, v, g, beta, o, state, state_indices, query_start_loc, seq_list, scale, use_qk_l2norm)
    if long_seqs:
        _chunked(q, k, v, g, beta, o, state, state_indices.long(), qsl_host, long_seqs, scale, use_qk_l2norm)
    return o
