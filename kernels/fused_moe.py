"""Fused mixture-of-experts: routed experts as two grouped GEMMs, no host sync.

    out[t] = sum over the k experts e chosen for token t of
             w[t, e] * down_e(silu(gate_e(x[t])) * up_e(x[t]))

Expert weights are `ExpertWeights` (moe_weights.py: float, Int4 or FP8, stacked
along a leading expert dim; gate_up holds gate's I rows then up's). The kernel
dequantizes Int4 and FP8 tiles inside its K loop, as int4_matmul / fp8_matmul do
(FP8 by Triton's e4m3 type from sm89, by integer bit decoding before).

Implementations behind one dispatch (`fused_moe`), all with one signature:
- `fused_moe_ref`: plain torch, the CPU path and the oracle. It visits only the
  experts some token chose, which it learns by reading the per-expert counts on
  the host: on CUDA that is a sync, so it is not the GPU path.
- `fused_moe_triton`: route (moe_routing.py), align the pairs to blocks of
  `block_m` rows of one expert, then two launches of one grouped-GEMM kernel:
  gate_up with SiLU(gate) * up in its epilogue, writing [T*k, I]; down with the
  routing weight in its epilogue, summing the k experts of a token by fp32
  atomics into [T, H] (so the summation order, and the last bit, may vary
  from run to run). Grids have fixed sizes (blocks without an expert exit at
  once): about 7 launches per layer whatever the routing, no host sync.
- `fused_moe_grouped_mm`: torch's grouped GEMM for bf16 float weights. Used
  only where it runs without a sync: torch's `_grouped_mm_cuda`
  (aten/src/ATen/native/cuda/GroupedBlas.cpp) takes its CUTLASS path on
  compute capability 9.x / 10.x and otherwise falls back to a loop that reads
  the offsets to the host; sm86 and sm120 cards therefore use the Triton kernel.
All of them take `lora`: LoRA adapters on the routed experts (moe_lora.py), each
pair's gate_up delta added before the activation (in the Triton kernel's epilogue)
and its down delta, times the routing weight, to the token's output.
This module knows nothing of models or checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pprt_kernels import num_sms, use_triton
from pprt_kernels.fp8_matmul import native_fp8
from pprt_kernels.lora import lora_delta_ref
from pprt_kernels.moe_lora import ExpertLora, down_delta, gate_up_delta, pair_index
from pprt_kernels.moe_routing import MoEAlignment, moe_align_gpu, moe_route_ref, moe_route_triton
from pprt_kernels.moe_weights import ExpertFormat, ExpertWeights, check_moe_args

try:
    import triton
    import triton.language as tl

    from pprt_kernels.fp8_matmul import _fp8_tile  # the FP8 tile decoder (native e4m3 or bits)
except ImportError:  # CPU-only installs run the reference
    triton = None


# ---------------------------------------------------------------- reference


def moe_experts_ref(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] routing weights (activation dtype)
    ids: torch.Tensor,  # int32 [T, k] chosen experts
    gate_up: ExpertWeights,  # N = 2I, K = H
    down: ExpertWeights,  # N = H, K = I
    lora: ExpertLora | None = None,
) -> torch.Tensor:  # [T, H] in x.dtype
    """Each chosen expert on its tokens at once; matmuls in fp32, silu(g)*u rounded to x.dtype, fp32 sum."""
    t, h, i = check_moe_args(x, weights, ids, gate_up, down)
    k = ids.shape[1]
    index = pair_index(lora, ids) if lora is not None else None  # [S]
    gu_delta = gate_up_delta(x, k, lora, index, lora_delta_ref) if lora is not None and lora.gate_up else None
    flat = ids.reshape(-1).long()  # [S]
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert
    counts = torch.bincount(flat, minlength=gate_up.num_experts).tolist()  # host read (a sync on CUDA)
    w_pair = weights.reshape(-1).float()
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        pairs = order[start:start + c]
        start += c
        tokens = pairs // k
        gu = x[tokens].float() @ gate_up.dense(e, x.dtype).t()  # [c, 2I]
        if gu_delta is not None:
            gu = gu + gu_delta[pairs].float()
        act = (F.silu(gu[:, :i]) * gu[:, i:]).to(x.dtype)
        y = act.float() @ down.dense(e, x.dtype).t()  # [c, H]
        if lora is not None and lora.down is not None:
            y = y + down_delta(act, lora, index[pairs], lora_delta_ref).float()
        out.index_add_(0, tokens, y * w_pair[pairs, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------- Triton

FLOAT_W, INT4_W, FP8_W = 0, 1, 2  # the kernel's FORMAT

if triton is not None:

    @triton.jit
    def _weight_tile(
        w_e, s_e, z_e, k0, offs_k, mask_k, offs_n, mask_n, scale_rows,
        stride_wn, stride_wk, stride_s1, stride_s2, stride_z1, stride_z2, dtype: tl.constexpr,
        FORMAT: tl.constexpr, GROUP: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        NATIVE_FP8: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """W_e^T tile [BK, BN] in `dtype`, dequantized as the format says (see moe_weights.py);
        scale_rows [BN]: the FP8 scale row of each column."""
        if FORMAT == 1:  # INT4: [K/8, N] words, [K/g, N] scales and zeros; BK divides the group
            words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            packed = tl.load(w_e + words[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                             mask=mask_n[None, :], other=0)  # [BK/8, BN] int32
            shifts = tl.arange(0, 8) * 4
            q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
            g = k0 // GROUP
            s = tl.load(s_e + g * stride_s1 + offs_n * stride_s2, mask=mask_n, other=0.0)
            z = tl.load(z_e + g * stride_z1 + offs_n * stride_z2, mask=mask_n, other=0).to(tl.int32)
            w = (q - z[None, :]).to(s.dtype) * s[None, :]  # exact ints times the scale, rounded once
        elif FORMAT == 2:  # FP8: [N, K] values, float32 scale per (SCALE_N, SCALE_K) block
            w = _fp8_tile(w_e, offs_n, offs_k, mask_k[:, None] & mask_n[None, :], stride_wn, stride_wk,
                          NATIVE_FP8)  # [BK, BN] fp32
            s = tl.load(s_e + scale_rows * stride_s1 + (k0 // SCALE_K) * stride_s2,
                        mask=mask_n, other=0.0)
            w = (w * s[None, :]).to(dtype)
        else:  # FLOAT: [N, K]
            w = tl.load(w_e + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        return w.to(dtype)

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, pairs_ptr, block_expert_ptr, rw_ptr, out_ptr, delta_ptr,
        N, K, S, k_per_split, up_scale_row0, stride_dm,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk,
        stride_se, stride_s1, stride_s2, stride_ze, stride_z1, stride_z2, stride_pe, stride_pk,
        stride_om, stride_on,
        TOP_K: tl.constexpr, GATE_UP: tl.constexpr, ATOMIC: tl.constexpr, FORMAT: tl.constexpr,
        GROUP: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, NATIVE_FP8: tl.constexpr,
        HAS_PERM: tl.constexpr, HAS_DELTA: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (row blocks, column blocks, K slices); each row block belongs to one expert.
        # GATE_UP: rows of x gathered by token (pair // TOP_K), N = I columns of gate and the same of
        #   up (at +N; FP8 scale rows from up_scale_row0), out[pair] = silu(gate) * up; HAS_DELTA: the
        #   pair's [2N] row of delta (LoRA, moe_lora.py) is added to gate and up first.
        # Else (down): rows of the [S, I] intermediate by pair, out[token] (+)= routing weight * result.
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:  # a block past the last used one: the grid is sized for the worst case
            return
        pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM], padding = S
        valid = pair < S
        a_row = pair
        if GATE_UP:
            a_row = pair // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_e = w_ptr + expert * stride_we
        s_e = s_ptr + expert * stride_se
        z_e = z_ptr + expert * stride_ze
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        k_start = pid_k * k_per_split  # a multiple of BLOCK_K; K tiles stay inside a group / scale block
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            cols = offs_k
            if HAS_PERM:
                cols = tl.load(perm_ptr + expert * stride_pe + offs_k * stride_pk, mask=mask_k, other=0)
            a = tl.load(a_ptr + a_row[:, None] * stride_am + cols[None, :] * stride_ak,
                        mask=valid[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            w = _weight_tile(w_e, s_e, z_e, k0, offs_k, mask_k, offs_n, mask_n, offs_n // SCALE_N,
                             stride_wn, stride_wk, stride_s1, stride_s2, stride_z1, stride_z2, a.dtype,
                             FORMAT, GROUP, SCALE_N, SCALE_K, NATIVE_FP8, BLOCK_K, BLOCK_N)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if GATE_UP:
                w = _weight_tile(w_e, s_e, z_e, k0, offs_k, mask_k, offs_n + N, mask_n,
                                 up_scale_row0 + offs_n // SCALE_N,  # up's own scale rows
                                 stride_wn, stride_wk, stride_s1, stride_s2, stride_z1, stride_z2, a.dtype,
                                 FORMAT, GROUP, SCALE_N, SCALE_K, NATIVE_FP8, BLOCK_K, BLOCK_N)
                acc_up = tl.dot(a, w, acc_up, input_precision=DOT_PRECISION)
        mask = valid[:, None] & mask_n[None, :]
        if GATE_UP:
            if HAS_DELTA:
                d_ptrs = delta_ptr + pair[:, None] * stride_dm + offs_n[None, :]
                acc += tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
                acc_up += tl.load(d_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
            out_row = pair
        else:
            acc = acc * tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
            out_row = pair // TOP_K
        out_ptrs = out_ptr + out_row[:, None] * stride_om + offs_n[None, :] * stride_on
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")  # fp32: the k experts of a token meet here
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block from the mean pairs per expert (decode: 16, the least tl.dot takes)."""
    mean = num_pairs / num_experts
    return 16 if mean <= 16 else 32 if mean <= 48 else 64


def _block_k(w: ExpertWeights, cap: int) -> int:
    """K tile: Int4 tiles never straddle a group, FP8 tiles never a scale block."""
    k = w.in_features
    if w.format is ExpertFormat.FLOAT:
        return min(cap, max(16, triton.next_power_of_2(k)))
    step = w.group_size if w.format is ExpertFormat.INT4 else w.block[1]
    for bk in (128, 64, 32, 16):
        if bk <= cap and (step % bk == 0 or (w.format is ExpertFormat.FP8 and step >= k)):
            return bk
    raise ValueError(f"fused_moe (triton): the {w.format.value} group / scale block along K ({step}) must be a "
                     "multiple of 16")


def _launch_gemm(a, w: ExpertWeights, align: MoEAlignment, rw, out, n: int, num_pairs: int, top_k: int,
                 gate_up: bool, split: int, block_n: int, block_k: int, delta=None) -> None:
    fmt = {ExpertFormat.FLOAT: FLOAT_W, ExpertFormat.INT4: INT4_W, ExpertFormat.FP8: FP8_W}[w.format]
    k = w.in_features
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty slices
    wt = w.weight
    native = fmt != FP8_W or native_fp8(wt.device)
    if fmt == FP8_W and not native:
        wt = wt.view(torch.uint8)  # pre-sm89: the kernel decodes the bits
    # FLOAT / FP8 [E, N, K]: dims (n, k); INT4 [E, K/8, N]: dims (k/8, n)
    stride_wn, stride_wk = (wt.stride(2), wt.stride(1)) if fmt == INT4_W else (wt.stride(1), wt.stride(2))
    s = w.scales if w.scales is not None else wt
    z = w.zeros if w.zeros is not None else wt
    perm = w.perm
    scale_n, scale_k = w.block if fmt == FP8_W else (1, 1)
    grid = (align.block_expert.numel(), triton.cdiv(n, block_n), split)
    _moe_gemm_kernel[grid](
        a, wt, s, z, perm if perm is not None else align.sorted_pairs, align.sorted_pairs, align.block_expert,
        rw, out, delta if delta is not None else out, n, k, num_pairs, k_per_split,
        w.scale_rows_per_part if fmt == FP8_W else 0, delta.stride(0) if delta is not None else 0,
        a.stride(0), a.stride(1), wt.stride(0), stride_wn, stride_wk,
        s.stride(0), s.stride(1), s.stride(2), z.stride(0), z.stride(1), z.stride(2),
        perm.stride(0) if perm is not None else 0, perm.stride(1) if perm is not None else 0,
        out.stride(0), out.stride(1),
        TOP_K=top_k, GATE_UP=gate_up, ATOMIC=not gate_up and (top_k > 1 or split > 1), FORMAT=fmt,
        GROUP=w.group_size if fmt == INT4_W else 1, SCALE_N=scale_n, SCALE_K=scale_k, NATIVE_FP8=native,
        HAS_PERM=perm is not None, HAS_DELTA=delta is not None,
        BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3,
    )


def moe_experts_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    block_m: int | None = None,  # None: from the shape; tests force values
    split_k: int | None = None,  # down projection's K slices; None: from the shape
    lora: ExpertLora | None = None,
) -> torch.Tensor:  # [T, H]
    """Launcher: align the pairs, then the two grouped GEMMs (shapes fixed by T, k, E: no host sync)."""
    t, h, i = check_moe_args(x, weights, ids, gate_up, down)
    if triton is None:
        raise RuntimeError("fused_moe: triton is not installed")
    top_k, e = ids.shape[1], gate_up.num_experts
    s = t * top_k
    if t == 0:
        return x.new_zeros((0, h))
    x, weights = x.contiguous(), weights.contiguous()
    align = moe_align_gpu(ids, e, block_m or _block_m(s, e))
    small = s <= 64  # decode: narrow tiles over many programs
    block_n = 64 if small else 128
    index = pair_index(lora, ids) if lora is not None else None  # [S]
    gu_delta = gate_up_delta(x, top_k, lora, index) if lora is not None and lora.gate_up else None  # [S, 2I]
    inter = x.new_empty((s, i))  # [S, I] silu(gate) * up, one row per pair
    _launch_gemm(x, gate_up, align, weights, inter, i, s, top_k, True, 1, block_n, _block_k(gate_up, 64),
                 gu_delta)
    bk = _block_k(down, 128 if small else 64)
    if split_k is None:  # decode: slice K until the weight streams from every SM
        tiles = min(s, e) * triton.cdiv(h, block_n)
        split_k = max(1, min(i // bk, triton.cdiv(2 * num_sms(x.device), tiles))) if small else 1
    atomic = top_k > 1 or split_k > 1
    out = torch.zeros((t, h), dtype=torch.float32, device=x.device) if atomic else x.new_empty((t, h))
    _launch_gemm(inter, down, align, weights, out, h, s, top_k, False, split_k, block_n, bk)
    if lora is not None and lora.down is not None:  # each pair's down delta times its routing weight
        dn = down_delta(inter, lora, index).float() * weights.reshape(-1, 1).float()  # [S, H]
        out = out.float() + dn.view(t, top_k, h).sum(dim=1)
    return out.to(x.dtype)


# ---------------------------------------------------------------- torch grouped GEMM


def grouped_mm_serves(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights) -> bool:
    """True where torch's grouped GEMM runs these experts without a host sync (see the module docstring)."""
    return (
        x.device.type == "cuda"
        and hasattr(F, "grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
        and x.dtype == torch.bfloat16
        and gate_up.format is ExpertFormat.FLOAT
        and down.format is ExpertFormat.FLOAT
        and x.shape[1] % 8 == 0  # 16-byte rows
        and down.in_features % 8 == 0
    )


def moe_experts_grouped_mm(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights,
    lora: ExpertLora | None = None,
) -> torch.Tensor:  # [T, H]
    """Float experts through F.grouped_mm over the expert-sorted pairs (block_m = 1: no padding)."""
    t, h, i = check_moe_args(x, weights, ids, gate_up, down)
    if gate_up.format is not ExpertFormat.FLOAT or down.format is not ExpertFormat.FLOAT:
        raise ValueError("fused_moe (grouped_mm): float expert weights only")
    top_k = ids.shape[1]
    align = moe_align_gpu(ids, gate_up.num_experts, 1)
    pairs = align.sorted_pairs.long()  # [S] pair ids, by expert
    gu = F.grouped_mm(x[pairs // top_k], gate_up.weight.transpose(1, 2), offs=align.expert_ends)  # [S, 2I]
    index = pair_index(lora, ids) if lora is not None else None  # [S] in pair order
    if lora is not None and lora.gate_up is not None:
        gu = gu + gate_up_delta(x, top_k, lora, index)[pairs]
    act = F.silu(gu[:, :i]) * gu[:, i:]
    y = F.grouped_mm(act, down.weight.transpose(1, 2), offs=align.expert_ends)  # [S, H]
    if lora is not None and lora.down is not None:
        y = y + down_delta(act, lora, index[pairs])
    y = y.float() * weights.reshape(-1)[pairs].float()[:, None]
    per_pair = torch.empty_like(y).index_copy_(0, pairs, y)  # back to pair order: [T*k, H]
    return per_pair.view(t, top_k, h).sum(dim=1).to(x.dtype)  # deterministic fp32 sum over the k experts


# ---------------------------------------------------------------- the whole layer


def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E]
    gate_up: ExpertWeights,
    down: ExpertWeights,
    top_k: int,
    renormalize: bool,
    lora: ExpertLora | None = None,
) -> torch.Tensor:  # [T, H] in x.dtype
    """Route (softmax in fp32, top-k, `renormalize`: weights summing to one) and run the chosen experts:
    the CPU path and the oracle. Raises ValueError naming any operand that does not fit the others."""
    weights, ids = moe_route_ref(router_logits, top_k, renormalize, x.dtype)
    return moe_experts_ref(x, weights, ids, gate_up, down, lora)


def fused_moe_triton(x, router_logits, gate_up: ExpertWeights, down: ExpertWeights, top_k: int,
                     renormalize: bool, lora: ExpertLora | None = None) -> torch.Tensor:
    """fused_moe_ref's contract on the Triton kernels (routing, alignment, two grouped GEMMs)."""
    weights, ids = moe_route_triton(router_logits, top_k, renormalize, x.dtype)
    return moe_experts_triton(x, weights, ids, gate_up, down, lora=lora)


def fused_moe_grouped_mm(x, router_logits, gate_up: ExpertWeights, down: ExpertWeights, top_k: int,
                         renormalize: bool, lora: ExpertLora | None = None) -> torch.Tensor:
    """fused_moe_ref's contract with torch's grouped GEMM for the experts (float weights)."""
    weights, ids = moe_route_triton(router_logits, top_k, renormalize, x.dtype)
    return moe_experts_grouped_mm(x, weights, ids, gate_up, down, lora)


def fused_moe(x, router_logits, gate_up: ExpertWeights, down: ExpertWeights, top_k: int,
              renormalize: bool, lora: ExpertLora | None = None) -> torch.Tensor:
    """The one entry point: torch's grouped GEMM where it serves, else Triton where `use_triton`, else the ref.
    lora: adapters on the routed experts for this step (moe_lora.py), or None."""
    if use_triton(x.device):
        if grouped_mm_serves(x, gate_up, down):
            return fused_moe_grouped_mm(x, router_logits, gate_up, down, top_k, renormalize, lora)
        return fused_moe_triton(x, router_logits, gate_up, down, top_k, renormalize, lora)
    return fused_moe_ref(x, router_logits, gate_up, down, top_k, renormalize, lora)
