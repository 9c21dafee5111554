"""Attention over a paged KV cache: Triton kernels and their torch reference.

Cache layout (one layer of one stage):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A sequence's token t lives in block `block_table[t // block_size]` at offset
`t % block_size`; its slot is `block * block_size + offset`.

One call serves decode (one query token per sequence) and prefill chunks
(several query tokens that attend to a cached prefix and causally to each
other). Queries of all sequences are packed along the token axis:
    q: [T, num_heads, head_dim]; sequence b owns rows
       query_start_loc[b] : query_start_loc[b + 1] (at least one row each)
    context_lens[b]: tokens of sequence b in the cache, this step's included;
       query row i of b sits at position context_lens[b] - q_len_b + i and
       attends to keys 0..that position.
The K/V of this step must already be written (`write_kv`).

fp8 cache: k_cache/v_cache may be torch.float8_e4m3fn with float32 scales
(pprt_kernels.kv_cache: the scale forms, `write_kv`); attention dequantizes on the fly.

Implementations: `*_ref` in plain torch (the CPU path and the test oracle) and
`paged_attention_triton` (flash-decoding for all-decode batches, a
flash-attention kernel with GQA-packed rows otherwise). `paged_attention`
dispatches with `pprt_kernels.use_triton`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import num_sms, use_triton
from .kv_cache import check_scale


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, tables: torch.Tensor, length: int) -> torch.Tensor:
    """Dequantized fp32 [B, length, m, h] of the tokens behind `tables` [B, blocks]."""
    B, n_blocks = tables.shape
    _, bs, m, h = cache.shape
    x = cache[tables].reshape(B, n_blocks * bs, m, h)[:, :length].float()
    if scale is not None and scale.numel() == 1:
        x = x * scale.reshape(())
    elif scale is not None:
        x = x * scale[tables].reshape(B, n_blocks * bs, m, 1)[:, :length]
    return x


def paged_attention_ref(
    q: torch.Tensor,  # [T, n, h]
    k_cache: torch.Tensor,  # [num_blocks, block_size, m, h]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:  # [T, n, h]
    """Causal GQA attention through block tables, in plain torch (fp32 math).

    Sequences are padded to the longest query and context of the batch and
    computed at once; padded rows and keys are masked out. The max_* hints,
    when given, save the device syncs that find those maxima.
    """
    check_scale(k_scale, k_cache, "k_scale")
    check_scale(v_scale, v_cache, "v_scale")
    T, n, h = q.shape
    m = k_cache.shape[2]
    bs = k_cache.shape[1]
    B = block_tables.shape[0]
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    ctx = context_lens.long()
    max_q = int(q_lens.max()) if max_query_len is None else max_query_len
    max_ctx = int(ctx.max()) if max_context_len is None else max_context_len
    n_blocks = (max_ctx + bs - 1) // bs
    tables = block_tables[:, :n_blocks].long()
    keys = _gather(k_cache, k_scale, tables, max_ctx)  # [B, S, m, h]
    values = _gather(v_cache, v_scale, tables, max_ctx)

    # Scatter packed queries into [B, max_q, n, h]
    row = torch.arange(max_q, device=q.device)
    valid_q = row[None, :] < q_lens[:, None]  # [B, max_q]
    src = (starts[:-1, None] + row[None, :]).clamp(max=T - 1)  # [B, max_q]
    qp = q.float()[src]  # [B, max_q, n, h]

    group = n // m
    qp = qp.view(B, max_q, m, group, h)
    scores = torch.einsum("bqmgh,bkmh->bmgqk", qp, keys) * scale  # [B, m, g, max_q, S]
    q_pos = ctx[:, None] - q_lens[:, None] + row[None, :]  # [B, max_q]
    key_pos = torch.arange(max_ctx, device=q.device)
    allowed = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, S] (implies < ctx)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded rows are all -inf
    out = torch.einsum("bmgqk,bkmh->bqmgh", probs, values).reshape(B, max_q, n, h)
    return out[valid_q].to(q.dtype)  # back to packed [T, n, h]


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _load_tile(cache, scales, table_row, kv_head, tok, tok_mask, d, d_mask,
               s_b, s_s, s_h, c_b, c_s, c_h, BLOCK_SIZE: tl.constexpr, SCALED: tl.constexpr):
    """K or V rows of tokens `tok` [N] through the block table, as fp32 or cache dtype: [N, D_PAD]."""
    blk = tl.load(table_row + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    off = tok % BLOCK_SIZE
    x = tl.load(cache + blk[:, None] * s_b + off[:, None] * s_s + kv_head * s_h + d[None, :],
                mask=tok_mask[:, None] & d_mask[None, :], other=0.0)
    if SCALED:
        s = tl.load(scales + blk * c_b + off * c_s + kv_head * c_h, mask=tok_mask, other=0.0)
        x = x.to(tl.float32) * s[:, None]
    return x


@triton.jit
def _attend(qv, m_i, l_i, acc, k_cache, v_cache, k_scale, v_scale, table_row, kv_head, t0, key_end, q_pos,
            d, d_mask, sm_scale_log2, skb, sks, skh, svb, svs, svh, kcb, kcs, kch, vcb, vcs, vch,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, CAUSAL: tl.constexpr):
    """One online-softmax step of rows `qv` [M, D_PAD] over keys t0..t0+BLOCK_N (log2 domain)."""
    tok = t0 + tl.arange(0, BLOCK_N)
    tok_mask = tok < key_end
    k = _load_tile(k_cache, k_scale, table_row, kv_head, tok, tok_mask, d, d_mask,
                   skb, sks, skh, kcb, kcs, kch, BLOCK_SIZE, SCALED).to(qv.dtype)
    s = tl.dot(qv, tl.trans(k)) * sm_scale_log2  # [M, BLOCK_N]
    allowed = tok_mask[None, :]
    if CAUSAL:
        allowed = allowed & (tok[None, :] <= q_pos[:, None])
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = _load_tile(v_cache, v_scale, table_row, kv_head, tok, tok_mask, d, d_mask,
                   svb, svs, svh, vcb, vcs, vch, BLOCK_SIZE, SCALED).to(qv.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(qv.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(out, part_acc, part_max, part_sum, q, k_cache, v_cache, k_scale, v_scale,
                   block_tables, context_lens, sm_scale_log2, partition,
                   sqt, sqh, sot, soh, skb, sks, skh, svb, svs, svh, kcb, kcs, kch, vcb, vcs, vch, sbt,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, DIRECT: tl.constexpr):
    """Program (seq b, kv head, partition p): all GROUP query heads over keys of one partition."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    ctx = tl.load(context_lens + b)
    start = part * partition  # a runtime value: no recompiles as contexts grow
    if start < ctx:
        end = tl.minimum(start + partition, ctx)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        heads = kv_head * GROUP + g
        row_mask = (g < GROUP)[:, None] & d_mask[None, :]
        qv = tl.load(q + b * sqt + heads[:, None] * sqh + d[None, :], mask=row_mask, other=0.0)  # [G_PAD, D_PAD]
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        table_row = block_tables + b.to(tl.int64) * sbt
        for t0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attend(qv, m_i, l_i, acc, k_cache, v_cache, k_scale, v_scale, table_row, kv_head,
                                    t0, end, m_i, d, d_mask, sm_scale_log2, skb, sks, skh, svb, svs, svh,
                                    kcb, kcs, kch, vcb, vcs, vch, BLOCK_SIZE, BLOCK_N, SCALED, False)
        if DIRECT:  # a single partition: the final output
            o = acc / l_i[:, None]
            tl.store(out + b * sot + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty), mask=row_mask)
        else:  # unnormalized partial, with its max and sum, at [b, head, part]
            idx = (b * GROUP * tl.num_programs(1) + heads) * num_parts + part  # [G_PAD]
            tl.store(part_acc + idx[:, None] * D_PAD + d[None, :], acc, mask=row_mask)
            tl.store(part_max + idx, m_i, mask=g < GROUP)
            tl.store(part_sum + idx, l_i, mask=g < GROUP)


@triton.jit
def _reduce_kernel(out, part_acc, part_max, part_sum, context_lens, partition, num_parts, sot, soh,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_CHUNK: tl.constexpr):
    """Program (seq b, head h): combine the partitions of b by log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    used = tl.cdiv(tl.load(context_lens + b), partition)
    base = (b * tl.num_programs(1) + h) * num_parts
    pp = tl.arange(0, P_CHUNK)
    d = tl.arange(0, D_PAD)
    m_all = tl.full([P_CHUNK], float("-inf"), tl.float32)
    for c in range(0, used, P_CHUNK):
        m_all = tl.maximum(m_all, tl.load(part_max + base + c + pp, mask=c + pp < used, other=float("-inf")))
    m_max = tl.max(m_all, 0)
    total = tl.zeros([P_CHUNK], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for c in range(0, used, P_CHUNK):
        mask = c + pp < used
        w = tl.exp2(tl.load(part_max + base + c + pp, mask=mask, other=float("-inf")) - m_max)  # [P_CHUNK]
        total += w * tl.load(part_sum + base + c + pp, mask=mask, other=0.0)
        parts = tl.load(part_acc + (base + c + pp)[:, None] * D_PAD + d[None, :],
                        mask=mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [P_CHUNK, D_PAD]
        acc += tl.sum(w[:, None] * parts, 0)
    o = acc / tl.sum(total, 0)
    tl.store(out + b * sot + h * soh + d, o.to(out.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(out, q, k_cache, v_cache, k_scale, v_scale, block_tables, query_start_loc, context_lens,
                    sm_scale_log2, num_seqs,
                    sqt, sqh, sot, soh, skb, sks, skh, svb, svs, svh, kcb, kcs, kch, vcb, vcs, vch, sbt,
                    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr):
    """Program (query tile, kv head): BLOCK_Q tokens x GROUP heads packed as BLOCK_M rows.

    Tiles are numbered per sequence from query_start_loc[b] // BLOCK_Q + b, so
    the grid needs no host sync; a program finds its sequence by bisection.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = tile * 0  # int32 tensors: loop-carried values keep one type
    hi = lo + num_seqs - 1
    while lo < hi:  # largest b with first_tile(b) <= tile
        mid = (lo + hi + 1) // 2
        ok = tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    b = lo
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    j = tile - (q_start // BLOCK_Q + b)
    if j * BLOCK_Q < q_len:
        ctx = tl.load(context_lens + b)
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        tok = j * BLOCK_Q + r // GROUP  # query index within the sequence
        heads = kv_head * GROUP + r % GROUP
        row_ok = (r < BLOCK_Q * GROUP) & (tok < q_len)
        q_pos = ctx - q_len + tok  # [BLOCK_M]
        q_off = (q_start + tok).to(tl.int64)[:, None] * sqt + heads[:, None] * sqh + d[None, :]
        qv = tl.load(q + q_off, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        table_row = block_tables + b.to(tl.int64) * sbt
        first_pos = ctx - q_len + j * BLOCK_Q
        key_end = tl.minimum(first_pos + BLOCK_Q, ctx)  # keys past the tile's last row are never seen
        n_full = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles every row sees whole: no mask
        for t0 in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _attend(qv, m_i, l_i, acc, k_cache, v_cache, k_scale, v_scale, table_row, kv_head,
                                    t0, key_end, q_pos, d, d_mask, sm_scale_log2, skb, sks, skh, svb, svs, svh,
                                    kcb, kcs, kch, vcb, vcs, vch, BLOCK_SIZE, BLOCK_N, SCALED, False)
        for t0 in range(n_full, key_end, BLOCK_N):
            m_i, l_i, acc = _attend(qv, m_i, l_i, acc, k_cache, v_cache, k_scale, v_scale, table_row, kv_head,
                                    t0, key_end, q_pos, d, d_mask, sm_scale_log2, skb, sks, skh, svb, svs, svh,
                                    kcb, kcs, kch, vcb, vcs, vch, BLOCK_SIZE, BLOCK_N, SCALED, True)
        o = acc / l_i[:, None]
        o_off = (q_start + tok).to(tl.int64)[:, None] * sot + heads[:, None] * soh + d[None, :]
        tl.store(out + o_off, o.to(out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


# ---------------------------------------------------------------- launchers


def _scale_args(scale: torch.Tensor | None, cache: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The scale tensor and its (block, slot, head) strides; a per-tensor scale broadcasts with strides 0."""
    if scale is None:
        return cache, (0, 0, 0)  # never read (SCALED is False)
    if scale.numel() == 1:
        return scale, (0, 0, 0)
    return scale, tuple(scale.stride())


def _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, context_lens) -> None:
    T, n, h = q.shape
    nb, bs, m, hk = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} != k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if hk != h or n % m:
        raise ValueError(f"q heads {n} x dim {h} do not fit the cache's {m} kv heads x dim {hk}")
    if bs & (bs - 1):
        raise ValueError(f"block_size {bs} is not a power of two")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous head_dim")
    if block_tables.stride(1) != 1 or not query_start_loc.is_contiguous() or not context_lens.is_contiguous():
        raise ValueError("block_tables rows, query_start_loc and context_lens must be contiguous")
    B = block_tables.shape[0]
    if query_start_loc.shape != (B + 1,) or context_lens.shape != (B,):
        raise ValueError(f"query_start_loc {tuple(query_start_loc.shape)} / context_lens {tuple(context_lens.shape)} "
                         f"do not match {B} block-table rows")


@functools.lru_cache(maxsize=None)
def decode_partition(max_context: int, batch: int, kv_heads: int, device: torch.device, block_n: int) -> int:
    """Tokens per flash-decoding partition: ~8 programs per SM, at least 256 tokens (a power of two)."""
    want = max(1, 8 * num_sms(device) // (batch * kv_heads))  # partitions per (sequence, kv head)
    return max(256, block_n, triton.next_power_of_2(triton.cdiv(max_context, want)))


def paged_attention_triton(
    q: torch.Tensor,  # [T, n, h]
    k_cache: torch.Tensor,  # [num_blocks, block_size, m, h]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    partition_size: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [T, n, h]
    """`paged_attention_ref` in Triton; needs no device sync.

    All-decode batches (max_query_len == 1, or T == B when not given) run
    flash-decoding: programs (sequence, kv head, partition of
    `partition_size` tokens), then a log-sum-exp reduction when there is more
    than one partition. Other batches (prefill chunks, mixed with decode rows)
    run one flash-attention program per (tile of query tokens, kv head).
    The grid covers max_context_len, or else the block table's width.
    partition_size / block_m / block_n override the tile choices (tests).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    check_scale(k_scale, k_cache, "k_scale")
    check_scale(v_scale, v_cache, "v_scale")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale, or neither")
    out_dtype = q.dtype
    if q.dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        q = q.float()  # the interpreter's tl.dot is wrong on bf16 operands; K/V follow q's dtype
    T, n, h = q.shape
    _, bs, m, _ = k_cache.shape
    B = block_tables.shape[0]
    group, d_pad = n // m, max(16, triton.next_power_of_2(h))
    out = torch.empty_like(q)
    k_sc, k_st = _scale_args(k_scale, k_cache)
    v_sc, v_st = _scale_args(v_scale, v_cache)
    common = dict(HEAD_DIM=h, D_PAD=d_pad, BLOCK_SIZE=bs, SCALED=k_scale is not None)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
               *k_st, *v_st, block_tables.stride(0))
    sm_scale_log2 = scale * math.log2(math.e)

    if max_query_len == 1 or (max_query_len is None and T == B):
        bn = block_n or (64 if d_pad <= 128 else 32)
        max_ctx = max_context_len if max_context_len is not None else block_tables.shape[1] * bs
        part = partition_size or decode_partition(max_ctx, B, m, q.device, bn)
        if part % bn:
            raise ValueError(f"partition_size {part} is not a multiple of block_n {bn}")
        num_parts = triton.cdiv(max(max_ctx, 1), part)
        direct = num_parts == 1
        shape = (B, n, num_parts) if not direct else (1,)
        part_acc = torch.empty(*shape, d_pad if not direct else 1, dtype=torch.float32, device=q.device)
        part_max = torch.empty(shape, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(shape, dtype=torch.float32, device=q.device)
        _decode_kernel[(B, m, num_parts)](
            out, part_acc, part_max, part_sum, q, k_cache, v_cache, k_sc, v_sc, block_tables, context_lens,
            sm_scale_log2, part, *strides, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
            BLOCK_N=bn, DIRECT=direct, num_warps=4, **common)
        if not direct:
            _reduce_kernel[(B, n)](out, part_acc, part_max, part_sum, context_lens, part, num_parts,
                                   out.stride(0), out.stride(1), HEAD_DIM=h, D_PAD=d_pad, P_CHUNK=16, num_warps=4)
        return out.to(out_dtype)

    bm = block_m or (128 if d_pad <= 128 else 64)
    bm = max(bm, triton.next_power_of_2(group))
    bn = block_n or (64 if d_pad <= 128 else 32)
    block_q = bm // group
    grid = (triton.cdiv(T, block_q) + B, m)  # >= sum over sequences of their tiles
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, k_sc, v_sc, block_tables, query_start_loc, context_lens, sm_scale_log2, B,
        *strides, GROUP=group, BLOCK_Q=block_q, BLOCK_M=bm, BLOCK_N=bn, num_warps=8 if bm >= 128 else 4, **common)
    return out.to(out_dtype)


# ---------------------------------------------------------------- dispatch


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:  # [T, n, h]
    """Dispatch: the Triton kernels when `use_triton(q.device)`, else the reference."""
    fn = paged_attention_triton if use_triton(q.device) else paged_attention_ref
    return fn(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, k_scale=k_scale,
              v_scale=v_scale, max_query_len=max_query_len, max_context_len=max_context_len)
