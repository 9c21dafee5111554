"""The gated delta rule over packed sequences, with a recurrent state per sequence in a slot pool.

The core of the Gated DeltaNet layer (Qwen3-Next, Qwen3.5), as transformers'
`torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule` compute it
(models/qwen3_next/modeling_qwen3_next.py; Yang et al., "Gated Delta Networks", 2024),
for a batch of sequences at once (layout: pprt_kernels.varlen):
    q, k [T, Hv, dk]: one query/key per value head (the caller repeats key heads);
        with use_qk_l2norm both are L2-normalised, x * rsqrt(sum(x^2) + 1e-6), and q is
        multiplied by `scale` (dk^-0.5 in the released models);
    v [T, Hv, dv]; g [T, Hv] fp32 log-decay (-exp(A_log) * softplus(a + dt_bias));
    beta [T, Hv] (sigmoid(b));
    state [num_slots, Hv, dk, dv] (fp32 in the models): slot state_indices[b] is
        sequence b's initial state, overwritten IN PLACE with its final state.
Per token t, per head, in fp32:
    S = S * exp(g_t);  u = beta_t * (v_t - S^T k_t);  S = S + k_t u^T;  o_t = S^T q_t
Output o [T, Hv, dv] in v.dtype.

Three implementations behind `gated_delta_rule` (dispatch: `pprt_kernels.use_triton`):
- `gated_delta_rule_ref`: that recurrence token by token per sequence, the oracle.
- `gated_delta_rule_chunked`, the CPU path: sequences of CPU_CHUNK_MIN rows or more by
  the chunked (UT-transform) form, 64-row chunks of matmuls (2048 rows x 8 heads x 128:
  0.27 s vs 1.8 s token by token, 1 thread); shorter ones (decode) token by token, all
  sequences in lockstep. On CPU the states are gathered and scattered (cheap there).
- `gated_delta_rule_triton` (pprt_kernels.gated_delta_triton): in place on GPU.
This module knows nothing of projections, the conv, or how key heads map to value heads.
"""

from __future__ import annotations

import torch

from . import use_triton
from .varlen import check_layout, check_layout_values

L2NORM_EPS = 1e-6  # as fla and transformers
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_CHUNK = 64  # rows per chunk of the chunked CPU path
CPU_CHUNK_MIN = 8  # rows from which a sequence takes the chunked CPU path (measured crossover, 1 thread)


def _check(q, k, v, g, beta, state, state_indices, query_start_loc, max_query_len) -> tuple[int, int, int, int]:
    """Shapes, dtypes, devices (no device sync); returns (T, Hv, dk, dv). Raises ValueError."""
    if q.dim() != 3 or tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"gated_delta_rule: q and k must be [T, Hv, dk], got {tuple(q.shape)}, {tuple(k.shape)}")
    t, h, dk = q.shape
    if v.dim() != 3 or tuple(v.shape[:2]) != (t, h):
        raise ValueError(f"gated_delta_rule: v must be [T={t}, Hv={h}, dv], got {tuple(v.shape)}")
    dv = v.shape[2]
    for name, tensor in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"gated_delta_rule: {name} dtype {tensor.dtype} is not fp16/bf16/fp32")
    if tuple(g.shape) != (t, h) or g.dtype != torch.float32:
        raise ValueError(f"gated_delta_rule: g must be float32 [T={t}, Hv={h}], got {g.dtype} {tuple(g.shape)}")
    if tuple(beta.shape) != (t, h):
        raise ValueError(f"gated_delta_rule: beta must be [T={t}, Hv={h}], got {tuple(beta.shape)}")
    if state.dim() != 4 or tuple(state.shape[1:]) != (h, dk, dv) or state.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"gated_delta_rule: state must be [num_slots, Hv={h}, dk={dk}, dv={dv}] (float32), "
            f"got {state.dtype} {tuple(state.shape)}"
        )
    for name, tensor in (("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state)):
        if tensor.device != q.device:
            raise ValueError(f"gated_delta_rule: {name} is on {tensor.device}, q on {q.device}")
    check_layout("gated_delta_rule", t, query_start_loc, state_indices, q.device)
    if max_query_len is not None and (not isinstance(max_query_len, int) or max_query_len < 0):
        raise ValueError(f"gated_delta_rule: max_query_len must be a host int >= 0, got {max_query_len!r}")
    return t, h, dk, dv


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + 1e-6) over the last axis, in fp32 (transformers' and fla's formula)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def prepare_qk(
    q: torch.Tensor, k: torch.Tensor, scale: float, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k in fp32, normalised if asked, q scaled: the operands of the recurrence."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q.float() * scale, k.float()


def gated_delta_rule_ref(
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
    max_query_len: int | None = None,
) -> torch.Tensor:  # [T, Hv, dv] in v.dtype
    """The recurrence token by token, per sequence, in fp32: the oracle of every other path.

    max_query_len is accepted for the common signature and not needed here. Raises
    ValueError for bad shapes or dtypes, a layout that does not cover the rows, or a
    slot out of range or named twice.
    """
    t, _, _, _ = _check(q, k, v, g, beta, state, state_indices, query_start_loc, max_query_len)
    qsl, slots = check_layout_values("gated_delta_rule", t, state.shape[0], query_start_loc, state_indices)
    out_dtype = v.dtype
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)  # [T, Hv, dk] fp32
    v, beta = v.float(), beta.float()  # [T, Hv, dv], [T, Hv]
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)  # [T, Hv, dv]
    for b, slot in enumerate(slots):
        rows = slice(qsl[b], qsl[b + 1])
        o[rows], s = _recurrent_sequence(q[rows], k[rows], v[rows], g[rows], beta[rows], state[slot].float())
        state[slot] = s.to(state.dtype)
    return o.to(out_dtype)


def _recurrent_sequence(
    q: torch.Tensor,  # [L, Hv, dk] fp32, normalised and scaled
    k: torch.Tensor,  # [L, Hv, dk] fp32
    v: torch.Tensor,  # [L, Hv, dv] fp32
    g: torch.Tensor,  # [L, Hv] fp32
    beta: torch.Tensor,  # [L, Hv] fp32
    s: torch.Tensor,  # [Hv, dk, dv] fp32 initial state
) -> tuple[torch.Tensor, torch.Tensor]:  # o [L, Hv, dv], final state
    """One sequence, token by token: the recurrence as written."""
    o = torch.empty_like(v)
    decay = g.exp()[:, :, None, None]  # [L, Hv, 1, 1]
    for i in range(v.shape[0]):
        s = s * decay[i]
        u = beta[i][:, None] * (v[i] - torch.einsum("hkv,hk->hv", s, k[i]))  # [Hv, dv]
        s = s + k[i][:, :, None] * u[:, None, :]
        o[i] = torch.einsum("hkv,hk->hv", s, q[i])
    return o, s


# ---------------------------------------------------------------- CPU path for long prefill


def _chunked_sequence(
    q: torch.Tensor,  # [H, L, dk] fp32, normalised and scaled
    k: torch.Tensor,  # [H, L, dk] fp32
    v: torch.Tensor,  # [H, L, dv] fp32
    g: torch.Tensor,  # [H, L] fp32
    beta: torch.Tensor,  # [H, L] fp32
    s: torch.Tensor,  # [H, dk, dv] fp32 initial state
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # o [H, L, dv], final state [H, dk, dv]
    """One sequence by the chunked (WY / UT-transform) form of the same recurrence.

    Within a chunk, with S0 the state before it, G_i = sum of g over its rows 0..i and
    D_ij = exp(G_i - G_j): unrolling the recurrence gives
        u = (I + A)^-1 (beta v - beta exp(G) k S0),  A_ij = beta_i D_ij k_i.k_j  (j < i)
        o_i = exp(G_i) S0^T q_i + sum_{j <= i} D_ij (q_i.k_j) u_j
        S_end = exp(G_last) S0 + sum_j D_last,j k_j u_j^T
    (Yang et al., "Gated Delta Networks", section 3; the form of transformers'
    torch_chunk_gated_delta_rule). Padding rows carry beta = 0 and g = 0: they change nothing.
    """
    h, length, dk = k.shape
    pad = -length % chunk
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (length + pad) // chunk
    q, k, v = (x.reshape(h, n, chunk, -1) for x in (q, k, v))  # [H, N, C, d]
    g, beta = g.reshape(h, n, chunk).cumsum(-1), beta.reshape(h, n, chunk, 1)  # G [H, N, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # D [H, N, C, C]
    eye = torch.eye(chunk, device=q.device)
    a = ((beta * k) @ k.transpose(-1, -2) * decay).tril(-1) + eye  # I + A, unit lower triangular
    u_v = torch.linalg.solve_triangular(a, beta * v, upper=False, unitriangular=True)  # [H, N, C, dv]
    w = torch.linalg.solve_triangular(a, beta * g.exp()[..., None] * k, upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * decay  # [H, N, C, C]
    q_decayed = q * g.exp()[..., None]
    k_to_end = k * (g[..., -1:] - g).exp()[..., None]  # [H, N, C, dk]
    o = torch.empty_like(v)
    for i in range(n):
        u = u_v[:, i] - w[:, i] @ s  # [H, C, dv]
        o[:, i] = q_decayed[:, i] @ s + attn[:, i] @ u
        s = s * g[:, i, -1, None, None].exp() + k_to_end[:, i].transpose(-1, -2) @ u
    return o.reshape(h, -1, v.shape[-1])[:, :length], s


def gated_delta_rule_chunked(
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
    max_query_len: int | None = None,
    chunk: int = CPU_CHUNK,
) -> torch.Tensor:  # [T, Hv, dv] in v.dtype
    """The CPU path: sequences of at least CPU_CHUNK_MIN rows by the chunked form, shorter
    ones (decode) token by token, all of them in lockstep. Same signature, checks and
    errors as the reference."""
    t, _, _, _ = _check(q, k, v, g, beta, state, state_indices, query_start_loc, max_query_len)
    qsl, slots = check_layout_values("gated_delta_rule", t, state.shape[0], query_start_loc, state_indices)
    out_dtype = v.dtype
    q, k = prepare_qk(q, k, scale, use_qk_l2norm)  # [T, Hv, dk] fp32
    v, beta = v.float(), beta.float()
    o = torch.empty(v.shape, dtype=torch.float32, device=v.device)  # [T, Hv, dv]
    lens = [e - s for s, e in zip(qsl, qsl[1:])]
    short = [b for b, n in enumerate(lens) if 0 < n < CPU_CHUNK_MIN]
    if short:
        ids = torch.tensor([slots[b] for b in short], device=state.device)
        s0 = state[ids].float()  # [n, Hv, dk, dv]: indexing copies, so the lockstep may work in place
        s = _recurrent_lockstep(q, k, v, g, beta, o, s0, [qsl[b] for b in short], [lens[b] for b in short])
        state[ids] = s.to(state.dtype)
    for b in (b for b, n in enumerate(lens) if n >= CPU_CHUNK_MIN):
        rows = slice(qsl[b], qsl[b + 1])
        per_head = (x[rows].transpose(0, 1) for x in (q, k, v, g, beta))  # [Hv, L, ...]
        o_t, s = _chunked_sequence(*per_head, state[slots[b]].float(), chunk)
        o[rows] = o_t.transpose(0, 1)
        state[slots[b]] = s.to(state.dtype)
    return o.to(out_dtype)


def _recurrent_lockstep(
    q: torch.Tensor,  # [T, Hv, dk] fp32, normalised and scaled
    k: torch.Tensor,  # [T, Hv, dk] fp32
    v: torch.Tensor,  # [T, Hv, dv] fp32
    g: torch.Tensor,  # [T, Hv] fp32
    beta: torch.Tensor,  # [T, Hv] fp32
    o: torch.Tensor,  # [T, Hv, dv] fp32, written at the sequences' rows
    s: torch.Tensor,  # [n, Hv, dk, dv] fp32 initial states of the n sequences
    starts: list[int],  # first row of each sequence
    lens: list[int],  # rows of each sequence (>= 1)
) -> torch.Tensor:  # [n, Hv, dk, dv] final states
    """n sequences token by token, step i advancing those with more than i rows (a decode
    step is one step for all: a handful of batched ops instead of a handful per sequence)."""
    first, lens_t = torch.tensor(starts, device=q.device), torch.tensor(lens, device=q.device)
    for i in range(max(lens)):
        act = None if i < min(lens) else (lens_t > i).nonzero()[:, 0]  # None: every sequence
        rows = first + i if act is None else first[act] + i
        si = s if act is None else s[act]  # [m, Hv, dk, dv], our own copy: updated in place
        k_i = k[rows][:, :, None, :]  # [m, Hv, 1, dk]
        si.mul_(g[rows].exp()[:, :, None, None])
        u = beta[rows][:, :, None, None] * (v[rows][:, :, None, :] - k_i @ si)  # [m, Hv, 1, dv]
        flat = si.view(-1, *si.shape[2:])  # [m * Hv, dk, dv]
        flat.baddbmm_(k_i.reshape(-1, 1, k_i.shape[-1]).transpose(1, 2), u.reshape(-1, 1, u.shape[-1]))  # + k u^T
        o[rows] = (q[rows][:, :, None, :] @ si)[:, :, 0]
        if act is not None:
            s[act] = si
    return s


def gated_delta_rule(
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
    max_query_len: int | None = None,  # host int, 1 = pure decode
) -> torch.Tensor:  # [T, Hv, dv] in v.dtype
    """The one entry point: Triton (pprt_kernels.gated_delta_triton) where `use_triton`, else
    the chunked torch path (token by token for short sequences)."""
    if use_triton(q.device):
        from .gated_delta_triton import gated_delta_rule_triton  # imports this module: not at the top

        return gated_delta_rule_triton(
            q, k, v, g, beta, state, state_indices, query_start_loc,
            scale=scale, use_qk_l2norm=use_qk_l2norm, max_query_len=max_query_len,
        )
    return gated_delta_rule_chunked(
        q, k, v, g, beta, state, state_indices, query_start_loc,
        scale=scale, use_qk_l2norm=use_qk_l2norm, max_query_len=max_query_len,
    )
