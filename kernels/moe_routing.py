"""MoE routing on the device: top-k experts per token, and token-expert pairs sorted by expert.

Two steps, each a Triton kernel beside a plain-torch `_ref` of the same signature:

- `moe_route`: softmax over the E router logits in fp32, the top-k experts, and
  optionally their weights renormalised to sum to one (qwen3_moe / Qwen3-Next /
  qwen2_moe with `norm_topk_prob`; Qwen3.5-MoE always). The weights are returned
  in the activation dtype, as transformers' routers return them.
- `moe_align`: the T*k token-expert pairs (pair p = token * k + slot) grouped by
  expert, each expert's run padded with the sentinel S = T*k to a multiple of
  `block_m`, so that a grouped GEMM can give each program one block of rows of
  one expert. Within an expert, pairs keep their order (the layout is a pure
  function of the routing). The layout has a size fixed by T, k, E and block_m
  alone (`aligned_size`), so nothing is read back to the host: the number of
  launches and their grids never depend on the routing.

Layout (`MoEAlignment`), S = T*k pairs, P = aligned_size(S, E, block_m):
    sorted_pairs int32 [P]           pair ids, expert 0's run first; padding = S
    block_expert int32 [P / block_m] the expert of each block of block_m rows, -1
                                     for blocks past the last used one
    expert_ends  int32 [E]           end of each expert's (padded) run; with block_m = 1
                                     these are torch's grouped_mm `offs`

The Triton align kernel is one program (one SM) that walks the pairs twice:
cheap for decode-sized steps, so above ALIGN_TRITON_MAX_PAIRS pairs the
reference (about 15 torch ops, also free of host syncs) is used on the GPU too.
This module knows nothing of expert weights (fused_moe.py) or of models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pprt_kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

ALIGN_TRITON_MAX_PAIRS = 1024  # above: the torch-op reference (a single-SM walk gets slow); to tune on a GPU
ALIGN_CHUNK_ELEMS = 8192  # [chunk, E_pad] working set of the align kernel


@dataclass(slots=True)
class MoEAlignment:
    """Token-expert pairs grouped by expert and padded to blocks (see the module docstring)."""

    sorted_pairs: torch.Tensor  # int32 [P]
    block_expert: torch.Tensor  # int32 [P / block_m]
    expert_ends: torch.Tensor  # int32 [E]
    block_m: int

    def __post_init__(self) -> None:
        p, nb = self.sorted_pairs.numel(), self.block_expert.numel()
        if self.block_m <= 0 or p != nb * self.block_m:
            raise ValueError(f"MoEAlignment: {p} sorted pairs are not {nb} blocks of block_m={self.block_m}")


def aligned_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """P: rows of the padded layout. At most min(S, E) experts are used, each padding < block_m rows."""
    rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-rows // block_m) * block_m


def _check_route(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"moe_route: router logits must be a float [T, E] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"moe_route: top_k = {top_k} must be in [1, E = {logits.shape[1]}]")


def _check_ids(ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if ids.dim() != 2 or ids.dtype != torch.int32:
        raise ValueError(f"moe_align: expert ids must be int32 [T, k], got {ids.dtype} {tuple(ids.shape)}")
    if num_experts <= 0 or block_m <= 0:
        raise ValueError(f"moe_align: num_experts {num_experts} and block_m {block_m} must be positive")


# ---------------------------------------------------------------- references


def moe_route_ref(
    logits: torch.Tensor,  # [T, E] router logits, any float dtype
    top_k: int,
    renormalize: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] out_dtype, expert ids int32 [T, k]
    """softmax(fp32) -> top-k (largest first) -> optional renormalisation -> cast."""
    _check_route(logits, top_k)
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), ids.to(torch.int32)


def moe_align_ref(ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The padded expert-sorted layout by torch ops of fixed shapes (no host read; stable within an expert)."""
    _check_ids(ids, num_experts, block_m)
    dev = ids.device
    flat = ids.reshape(-1).long()  # [S] expert of each pair
    s = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # [S] pair ids grouped by expert
    expert = flat[order]
    rank = torch.arange(s, device=dev) - (counts.cumsum(0) - counts)[expert]  # place within its expert
    p = aligned_size(s, num_experts, block_m)
    pairs = torch.full((p,), s, dtype=torch.int32, device=dev)
    pairs[(ends - padded)[expert] + rank] = order.to(torch.int32)
    first_row = torch.arange(0, p, block_m, device=dev)  # [P / block_m]
    owner = torch.searchsorted(ends, first_row, right=True)  # experts whose run ends at or before the row
    block_expert = torch.where(first_row < ends[-1], owner, -1).to(torch.int32)
    return MoEAlignment(pairs, block_expert, ends.to(torch.int32), block_m)


# ---------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _moe_route_kernel(
        logits_ptr, w_ptr, ids_ptr, T, E, stride_lt, stride_le,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        slots = tl.arange(0, K_PAD)
        mask_t = rows < T
        logits = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
                         mask=mask_t[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
        logits = tl.where(mask_t[:, None], logits, 0.0)  # rows past T: finite, never stored
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # padded experts: exp(-inf) = 0
        p = p / tl.sum(p, axis=1)[:, None]  # [BT, BE] softmax in fp32
        chosen_w = tl.full((BLOCK_T, K_PAD), 0.0, tl.float32)
        chosen_e = tl.full((BLOCK_T, K_PAD), 0, tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)  # [BT]
            idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index on ties
            chosen_w = tl.where(slots[None, :] == j, best[:, None], chosen_w)
            chosen_e = tl.where(slots[None, :] == j, idx[:, None], chosen_e)
            p = tl.where(cols[None, :] == idx[:, None], -1.0, p)  # taken
        if RENORM:
            chosen_w = chosen_w / tl.sum(chosen_w, axis=1)[:, None]
        out = rows[:, None] * TOP_K + slots[None, :]
        mask = mask_t[:, None] & (slots[None, :] < TOP_K)
        tl.store(w_ptr + out, chosen_w.to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(ids_ptr + out, chosen_e, mask=mask)

    @triton.jit
    def _moe_align_kernel(
        ids_ptr, pairs_ptr, block_expert_ptr, ends_ptr, S, E, P, NB,
        E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    ):
        # one program: count pairs per expert, lay the runs out, place every pair, label the blocks
        experts = tl.arange(0, E_PAD)
        lane = tl.arange(0, CHUNK)
        counts = tl.full((E_PAD,), 0, tl.int32)
        for c0 in range(0, S, CHUNK):
            e = tl.load(ids_ptr + c0 + lane, mask=c0 + lane < S, other=E_PAD)  # E_PAD matches no expert
            counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD]
        ends = tl.cumsum(padded, axis=0)
        total = tl.sum(padded, axis=0)
        tl.store(ends_ptr + experts, ends, mask=experts < E)
        for p0 in range(0, P, CHUNK):  # every row starts as padding; pairs overwrite their rows below
            tl.store(pairs_ptr + p0 + lane, S, mask=p0 + lane < P)
        tl.debug_barrier()  # the padding stores land before the pair stores
        next_row = ends - padded  # [E_PAD] where each expert's next pair goes
        earlier = lane[:, None] > lane[None, :]  # [CHUNK, CHUNK]: j comes before i
        for c0 in range(0, S, CHUNK):
            i = c0 + lane
            e = tl.load(ids_ptr + i, mask=i < S, other=E_PAD)
            hit = e[:, None] == experts[None, :]  # [CHUNK, E_PAD]
            base = tl.sum(tl.where(hit, next_row[None, :], 0), axis=1)
            rank = tl.sum(((e[:, None] == e[None, :]) & earlier).to(tl.int32), axis=1)  # same expert, earlier
            tl.store(pairs_ptr + base + rank, i, mask=i < S)
            next_row += tl.sum(hit.to(tl.int32), axis=0)
        for b0 in range(0, NB, CHUNK):
            first_row = (b0 + lane) * BLOCK_M
            owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + b0 + lane, tl.where(first_row < total, owner, -1), mask=b0 + lane < NB)


def moe_route_triton(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the routing kernel (one program per 16 tokens; E up to a few thousand)."""
    _check_route(logits, top_k)
    if triton is None:
        raise RuntimeError("moe_route: triton is not installed")
    t, e = logits.shape
    weights = torch.empty((t, top_k), dtype=out_dtype, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // block_e))
    if t:
        _moe_route_kernel[(triton.cdiv(t, block_t),)](
            logits, weights, ids, t, e, logits.stride(0), logits.stride(1),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORM=renormalize,
            BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
        )
    return weights, ids


def moe_align_triton(ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Launcher of the one-program align kernel (use below ALIGN_TRITON_MAX_PAIRS pairs)."""
    _check_ids(ids, num_experts, block_m)
    if triton is None:
        raise RuntimeError("moe_align: triton is not installed")
    ids = ids.contiguous()
    s = ids.numel()
    p = aligned_size(s, num_experts, block_m)
    pairs = torch.empty(p, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(p // block_m, dtype=torch.int32, device=ids.device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, ALIGN_CHUNK_ELEMS // e_pad))
    _moe_align_kernel[(1,)](
        ids, pairs, block_expert, ends, s, num_experts, p, p // block_m,
        E_PAD=e_pad, BLOCK_M=block_m, CHUNK=chunk, num_warps=8,
    )
    return MoEAlignment(pairs, block_expert, ends, block_m)


# ---------------------------------------------------------------- dispatch


def moe_route(
    logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing: the Triton kernel where `use_triton`, else the reference."""
    if use_triton(logits.device):
        return moe_route_triton(logits, top_k, renormalize, out_dtype)
    return moe_route_ref(logits, top_k, renormalize, out_dtype)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The padded layout: the one-program kernel for small steps where `use_triton`, else torch ops."""
    if use_triton(ids.device):
        return moe_align_gpu(ids, num_experts, block_m)
    return moe_align_ref(ids, num_experts, block_m)


def moe_align_gpu(ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """The GPU paths' choice by size alone: the one-program kernel up to ALIGN_TRITON_MAX_PAIRS, else torch ops."""
    if triton is not None and ids.numel() <= ALIGN_TRITON_MAX_PAIRS:
        return moe_align_triton(ids, num_experts, block_m)
    return moe_align_ref(ids, num_experts, block_m)
