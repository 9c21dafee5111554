"""W4A16 matmul: y = x @ dequant(W)^T (+ bias), W stored in pprt's Int4 format.

Weight layout (see pprt/quant.py for the full contract), N = out, K = in:
    qweight int32 [K/8, N]: nibble j (bits 4j..4j+3) of word [r, n] is q[8r + j, n]
    scales  [K/g, N] in the activation dtype; zeros uint8 [K/g, N]
    W^T[k, n] = scales[k // g, n] * (q[k, n] - zeros[k // g, n])

Three implementations behind one dispatch (`int4_matmul`):
- `int4_matmul_ref`: plain torch, the oracle (dequantize in x's dtype, matmul
  in fp32, round once to x's dtype).
- Triton on CUDA (or under TRITON_INTERPRET=1 with PPRT_KERNELS=triton):
  one kernel that dequantizes inside its K loop, tiled 16 rows high for
  M <= 16 (decode) and 64 or 128 rows for prefill; wherever the tiles alone
  would not fill the GPU, K is split into slices whose partial sums meet by
  fp32 atomics, so every SM streams weight. From M >= LARGE_M the weight is
  instead dequantized (in column chunks) to [K, N] for cuBLAS.
  Block sizes are heuristics: tune them with bench/int4_matmul.py.
- CPU: torch's own int4 matmul (`_weight_int4pack_mm_for_cpu`) when the layout
  allows it (N % 16 == 0, g in 32/64/128/256) and it measured faster: bf16 at
  any M (2048x2048, g128, 1 thread: 0.23 vs 72 ms at M=1, 35 vs 84 ms at
  M=64), fp16/fp32 only at M = 1 (fp32: 24 vs 46 ms; at M=4 already 113 vs
  64 ms). Numbers: bench/results/int4_matmul.jsonl.
  Its packed weight is built once by `pack_for_cpu` and passed in. Otherwise
  the reference.
The permutation of GPTQ desc_act checkpoints is applied by the caller (x[:, perm]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pprt_kernels import num_sms, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

SMALL_M = 16  # rows served by the split-K decode path
LARGE_M = 256  # rows from which dequantize + cuBLAS takes over
DEQUANT_CHUNK_ELEMS = 1 << 26  # elements of W^T dequantized at once on the large-M path (128 MiB in bf16)
CPU_INT4_MAX_M = 1  # fp16/fp32 rows for which torch's CPU int4 op beats dequantize + matmul (measured)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def int4_dequantize_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """W^T [K, N] in scales.dtype (each element rounded once from an exact product)."""
    k8, n = qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    q = q.view(-1, group_size, n) - zeros.to(torch.int32)[:, None, :]  # [K/g, g, N]
    w = q.to(torch.float32) * scales.to(torch.float32)[:, None, :]
    return w.to(scales.dtype).view(k8 * 8, n)


def int4_matmul_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K/8, N]
    scales: torch.Tensor,  # [K/g, N]
    zeros: torch.Tensor,  # uint8 [K/g, N]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x.dtype
    """Dequantize, then matmul in fp32; the oracle of every other path."""
    w_t = int4_dequantize_ref(qweight, scales, zeros, group_size).float()  # [K, N]
    out = x.float() @ w_t
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


# ---------------------------------------------------------------- CPU path


@dataclass(slots=True)
class CpuInt4Pack:
    """torch's CPU int4 layout of one weight, built once at load by `pack_for_cpu`."""

    packed: torch.Tensor  # uint8, torch's tiled [N, K/2] layout
    scale_zeros: torch.Tensor  # [K/g, N, 2] in scales.dtype: w = (q - 8) * s + zf
    group_size: int


def pack_for_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> CpuInt4Pack | None:
    """Convert to torch's CPU int4 layout; None where torch's op cannot take this weight."""
    n = qweight.shape[1]
    if qweight.device.type != "cpu" or n % 16 or group_size not in (32, 64, 128, 256):
        return None
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, n)  # [K, N]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1)
    # s * (q - z) = s * (q - 8) + s * (8 - z)
    zf = scales.float() * (8.0 - zeros.float())  # [K/g, N]
    scale_zeros = torch.stack([scales.float(), zf], dim=-1).to(scales.dtype).contiguous()
    return CpuInt4Pack(packed=packed, scale_zeros=scale_zeros, group_size=group_size)


def _cpu_int4_matmul(x: torch.Tensor, pack: CpuInt4Pack, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), pack.packed, pack.group_size, pack.scale_zeros)
    return out + bias if bias is not None else out


# ---------------------------------------------------------------- Triton path

if triton is not None:

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
        stride_zg, stride_zn, stride_om, stride_on,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (m blocks, n blocks, k slices): m fastest, so programs sharing a weight tile run together
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_kw = tl.arange(0, BLOCK_K // 8)
        shifts = tl.arange(0, 8) * 4
        # tl.full, not tl.zeros: zeros is a @jit helper that breaks the interpreter when
        # triton was imported before TRITON_INTERPRET was set (a test reloads this module)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        k_start = pid_k * k_per_split  # a multiple of BLOCK_K, and BLOCK_K divides GROUP
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                mask=mask_m[:, None], other=0.0,
            )  # [BM, BK]
            w = tl.load(
                qw_ptr + (k0 // 8 + offs_kw)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_n[None, :], other=0,
            )  # [BK/8, BN] int32
            q = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))  # row 8r + j
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)  # [BN]
            z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)
            wd = (q - z[None, :]).to(s.dtype) * s[None, :]  # [BK, BN], exact ints times the scale
            acc = tl.dot(x, wd, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")  # fp32 partial sums, order-free

    @triton.jit
    def _dequant_kernel(
        qw_ptr, s_ptr, z_ptr, out_ptr, N,
        stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ok, stride_on,
        GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # out: W^T [K, N] in the scales' dtype
        pid_k, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k0 = pid_k * BLOCK_K
        w = tl.load(
            qw_ptr + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=mask_n[None, :], other=0,
        )
        q = tl.reshape((w[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        g = k0 // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
        z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)
        wd = (q - z[None, :]).to(s.dtype) * s[None, :]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on, wd, mask=mask_n[None, :])


def _check(x, qweight, scales, zeros, group_size, bias) -> tuple[int, int, int]:
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError(
            f"int4_matmul: x must be [M, K] and qweight [K/8, N], got {tuple(x.shape)}, {tuple(qweight.shape)}"
        )
    m, k = x.shape
    n = qweight.shape[1]
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"int4_matmul: x dtype {x.dtype} is not fp16/bf16/fp32")
    if qweight.dtype != torch.int32 or qweight.shape[0] * 8 != k:
        raise ValueError(
            f"int4_matmul: qweight must be int32 [K/8={k // 8}, N], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if group_size <= 0 or k % group_size:
        raise ValueError(f"int4_matmul: group_size {group_size} does not divide K = {k}")
    groups = (k // group_size, n)
    if tuple(scales.shape) != groups or scales.dtype != x.dtype:
        raise ValueError(f"int4_matmul: scales must be {x.dtype} {groups}, got {scales.dtype} {tuple(scales.shape)}")
    if tuple(zeros.shape) != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"int4_matmul: zeros must be uint8 {groups}, got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"int4_matmul: bias must be {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, qweight, scales, zeros) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"int4_matmul: tensors are on different devices {sorted(map(str, devices))}")
    return m, n, k


def _block_k(group_size: int, cap: int) -> int:
    """The largest power of two <= cap dividing the group (tiles never straddle a group)."""
    for bk in (128, 64, 32, 16):
        if bk <= cap and group_size % bk == 0:
            return bk
    raise ValueError(f"int4_matmul (triton): group_size {group_size} must be a multiple of 16")


def int4_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,  # None: chosen from the shape; tests force values
    path: str | None = None,  # None: by M; "fused" or "dequant" forces a path (benchmarks)
) -> torch.Tensor:  # [M, N]
    """Launcher: checks, picks the path and block sizes, allocates the output.

    Never cached: the result depends on the tensors' contents, and a cache keyed by
    tensors would keep every call's inputs and output alive.
    """
    m, n, k = _check(x, qweight, scales, zeros, group_size, bias)
    if triton is None:
        raise RuntimeError("int4_matmul: triton is not installed")
    x = x.contiguous()
    path = path or ("dequant" if m >= LARGE_M else "fused")
    if path == "dequant":
        return _dequant_matmul(x, qweight, scales, zeros, group_size, bias)
    if path != "fused":
        raise ValueError(f"int4_matmul: path {path!r} is not 'fused' or 'dequant'")
    if m <= SMALL_M:  # decode: one row block; split K until the weight streams from every SM
        block_m, block_n, block_k, warps, stages, waves = 16, 64, _block_k(group_size, 128), 4, 3, 4
    elif m <= 64:  # prefill tiles, dequantized inside the K loop
        block_m, block_n, block_k, warps, stages, waves = 64, 128, _block_k(group_size, 64), 4, 4, 2
    else:
        block_m, block_n, block_k, warps, stages, waves = 128, 128, _block_k(group_size, 64), 8, 3, 2
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_k or max(1, min(k // block_k, triton.cdiv(waves * num_sms(x.device), tiles)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty slices
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _int4_matmul_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out.to(x.dtype) if split > 1 else out


def int4_dequantize_triton(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:  # W^T [K, N] in scales.dtype
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    block_k, block_n = _block_k(group_size, 64), 128
    out = torch.empty((k, n), device=qweight.device, dtype=scales.dtype)
    _dequant_kernel[(k // block_k, triton.cdiv(n, block_n))](
        qweight, scales, zeros, out, n,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return out


def _dequant_matmul(x, qweight, scales, zeros, group_size, bias) -> torch.Tensor:
    """Prefill: dequantize column chunks of W^T and let cuBLAS multiply."""
    k, n = x.shape[1], qweight.shape[1]
    cols = max(128, DEQUANT_CHUNK_ELEMS // k // 128 * 128)
    parts = []
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        w_t = int4_dequantize_triton(qweight[:, c0:c1], scales[:, c0:c1], zeros[:, c0:c1], group_size)  # [K, c]
        parts.append(torch.addmm(bias[c0:c1], x, w_t) if bias is not None else x @ w_t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ---------------------------------------------------------------- dispatch


def int4_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K/8, N]
    scales: torch.Tensor,  # [K/g, N]
    zeros: torch.Tensor,  # uint8 [K/g, N]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    cpu_pack: CpuInt4Pack | None = None,  # from pack_for_cpu, for the CPU fast path
) -> torch.Tensor:  # [M, N]
    """The one entry point: Triton where `use_triton`, else torch's CPU int4 op or the reference."""
    if use_triton(x.device):
        return int4_matmul_triton(x, qweight, scales, zeros, group_size, bias)
    _check(x, qweight, scales, zeros, group_size, bias)
    if (
        cpu_pack is not None
        and x.device.type == "cpu"
        and cpu_pack.scale_zeros.dtype == x.dtype
        and (x.dtype == torch.bfloat16 or x.shape[0] <= CPU_INT4_MAX_M)
    ):
        return _cpu_int4_matmul(x, cpu_pack, bias)
    return int4_matmul_ref(x, qweight, scales, zeros, group_size, bias)
