"""Attention over a paged KV cache.

Cache layout (one layer of one stage):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A sequence's token t lives in block `block_table[t // block_size]` at offset
`t % block_size`; its slot is `block * block_size + offset`.

One call serves decode (one query token per sequence) and prefill chunks
(several query tokens that attend to a cached prefix and causally to each
other). Queries of all sequences are packed along the token axis:
    q: [T, num_heads, head_dim]; sequence b owns rows
       query_start_loc[b] : query_start_loc[b + 1]
    context_lens[b]: tokens of sequence b in the cache, this step's included;
       query row i of b sits at position context_lens[b] - q_len_b + i and
       attends to keys 0..that position.
The K/V of this step must already be written (`write_kv`).
"""

from __future__ import annotations

import torch


def write_kv_ref(
    k: torch.Tensor,  # [T, m, h]
    v: torch.Tensor,  # [T, m, h]
    k_cache: torch.Tensor,  # [num_blocks, block_size, m, h]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int, slot of each token
) -> None:
    """Store this step's keys and values at their slots (in place)."""
    nb, bs, m, h = k_cache.shape
    k_cache.view(nb * bs, m, h).index_copy_(0, slot_mapping.long(), k.to(k_cache.dtype))
    v_cache.view(nb * bs, m, h).index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [T, n, h]
    k_cache: torch.Tensor,  # [num_blocks, block_size, m, h]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [T, n, h]
    """Causal GQA attention through block tables, in plain torch (fp32 math).

    Sequences are padded to the longest query and context of the batch and
    computed at once; padded rows and keys are masked out.
    """
    T, n, h = q.shape
    m = k_cache.shape[2]
    bs = k_cache.shape[1]
    B = block_tables.shape[0]
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    ctx = context_lens.long()
    max_q, max_ctx = int(q_lens.max()), int(ctx.max())
    n_blocks = (max_ctx + bs - 1) // bs
    tables = block_tables[:, :n_blocks].long()
    keys = k_cache[tables].reshape(B, n_blocks * bs, m, h)[:, :max_ctx].float()  # [B, S, m, h]
    values = v_cache[tables].reshape(B, n_blocks * bs, m, h)[:, :max_ctx].float()

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


def paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
    """Dispatch: the Triton kernel when `use_triton`, else the reference."""
    return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
