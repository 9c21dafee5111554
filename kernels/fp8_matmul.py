"""W8A16 matmul: y = x @ dequant(W)^T (+ bias), W stored in FP8 (e4m3) with block scales.

Weight layout (pprt/weights/fp8.py; the official Qwen FP8 layout), N = out, K = in:
    weight float8_e4m3fn [N, K]  (a uint8 view of the same bytes is accepted: the bits)
    scale  float32 [ceil(N/bn), ceil(K/bk)]   block (bn, bk): (128, 128) in official files,
                                              (1, K) per channel, (N, K) per tensor
    W[n, k] = float(weight[n, k]) * scale[n // bn, k // bk]   (the last blocks may be partial)

Three implementations behind one dispatch (`fp8_matmul`):
- `fp8_matmul_ref`: plain torch, the oracle and the CPU path (dequantize in x's dtype,
  each element rounded once from an exact fp32 product; matmul in fp32; round once).
- Triton on CUDA (or under TRITON_INTERPRET=1 with PPRT_KERNELS=triton), the int4
  kernel's structure: one kernel that dequantizes FP8 tiles inside its K loop, 16 rows
  high for M <= 16 (decode) and 64 or 128 rows for prefill, with K split into slices
  meeting by fp32 atomics where the tiles alone would not fill the GPU. From
  M >= LARGE_M the weight is dequantized (in row chunks) for cuBLAS.
  The e4m3 -> float conversion is Triton's own (`tl.float8e4nv`) on sm89 and newer;
  older cards (sm80/sm86: A100, 3090, A6000) have no e4m3 type, so the kernel decodes
  the bits by integer arithmetic: e4m3 s.eeee.mmm shifted into an fp16 s.0eeee.mmm0000000
  is the same number times 2^-8 (exponent bias 7 vs 15; subnormals map to subnormals),
  so value = fp16_bits(((b & 0x7F) << 7) | ((b & 0x80) << 8)) * 256, exact for every finite
  e4m3 (the NaN codes 0x7F/0xFF read as +-480: quantizers never write them).
  Chosen by capability (`native_fp8`), or forced by the caller (tests run both).
Tile sizes are heuristics, as in int4_matmul: tune them with bench/fp8_matmul.py.
"""

from __future__ import annotations

import torch

from pprt_kernels import num_sms, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

SMALL_M = 16  # rows served by the split-K decode tiles
LARGE_M = 256  # rows from which dequantize + cuBLAS takes over
DEQUANT_CHUNK_ELEMS = 1 << 26  # elements of W dequantized at once on the large-M path
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.uint8)


def native_fp8(device: torch.device) -> bool:
    """Whether Triton has the e4m3 type on `device` (CUDA sm89 and newer; the interpreter too)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def e4m3_to_float_ref(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3 bit patterns (uint8), by the same integer arithmetic as the kernel's
    pre-sm89 path; the NaN codes 0x7F / 0xFF give +-480."""
    b = bits.to(torch.int32)
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)  # fp16 bits, in 0..0xFFFF
    return (h - 65536 * (h >= 32768).to(torch.int32)).to(torch.int16).view(torch.float16).float() * 256.0


def fp8_dequantize_ref(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                       dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (each element rounded once from an exact fp32 product)."""
    n, k = weight.shape
    bn, bk = block
    w = weight.float() if weight.dtype == torch.float8_e4m3fn else e4m3_to_float_ref(weight)
    s = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]  # [N, K]
    return (w * s).to(dtype)


def fp8_matmul_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # float8_e4m3fn (or its uint8 bits) [N, K]
    scale: torch.Tensor,  # float32 [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int],  # (bn, bk)
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x.dtype
    """Dequantize in x's dtype, matmul in fp32, round once: the oracle of every other path."""
    _check(x, weight, scale, block, bias)
    out = x.float() @ fp8_dequantize_ref(weight, scale, block, x.dtype).float().t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _check(x, weight, scale, block, bias) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"fp8_matmul: x must be [M, K] and weight [N, K], got {tuple(x.shape)}, {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fp8_matmul: x dtype {x.dtype} is not fp16/bf16/fp32")
    if weight.dtype not in _WEIGHT_DTYPES or weight.shape[1] != k:
        raise ValueError(f"fp8_matmul: weight must be float8_e4m3fn (or uint8 bits) [N, K={k}], "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    bn, bk = block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"fp8_matmul: block {block} must be positive")
    blocks = (-(-n // bn), -(-k // bk))
    if scale.dtype != torch.float32 or tuple(scale.shape) != blocks:
        raise ValueError(f"fp8_matmul: scale must be float32 {blocks}, got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"fp8_matmul: bias must be {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, weight, scale) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"fp8_matmul: tensors are on different devices {sorted(map(str, devices))}")
    return m, n, k


# ---------------------------------------------------------------- Triton path

if triton is not None:

    @triton.jit
    def _fp8_tile(w_ptr, offs_n, offs_k, mask, stride_wn, stride_wk, NATIVE_FP8: tl.constexpr):
        """W^T tile [BK, BN] as float32 values (before the scale)."""
        ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        if NATIVE_FP8:
            w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        else:  # uint8 bits: e4m3 -> fp16 by shifting (see the module docstring)
            b = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
            h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
            w = h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        return w

    @triton.jit
    def _fp8_matmul_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # grid (m blocks, n blocks, k slices); a K tile never straddles a scale block
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        k_start = pid_k * k_per_split  # a multiple of BLOCK_K
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            w = _fp8_tile(w_ptr, offs_n, offs_k, mask_k[:, None] & mask_n[None, :], stride_wn, stride_wk,
                          NATIVE_FP8)  # [BK, BN] fp32
            s = tl.load(s_ptr + (offs_n // SCALE_N) * stride_sn + (k0 // SCALE_K) * stride_sk,
                        mask=mask_n, other=0.0)  # [BN] fp32
            wd = (w * s[None, :]).to(x.dtype)  # dequantized in x's dtype, rounded once
            acc = tl.dot(x, wd, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")  # fp32 partial sums

    @triton.jit
    def _fp8_dequant_kernel(
        w_ptr, s_ptr, out_ptr, N, K,
        stride_wn, stride_wk, stride_sn, stride_sk, stride_on, stride_ok,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        NATIVE_FP8: tl.constexpr,
    ):
        # out: W [N, K] in out's dtype
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        w = _fp8_tile(w_ptr, offs_n, offs_k, mask, stride_wn, stride_wk, NATIVE_FP8)  # [BK, BN]
        s = tl.load(s_ptr + (offs_n // SCALE_N)[None, :] * stride_sn + (offs_k // SCALE_K)[:, None] * stride_sk,
                    mask=mask, other=0.0)
        wd = (w * s).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[None, :] * stride_on + offs_k[:, None] * stride_ok, wd, mask=mask)


def _block_k(scale_k: int, k: int, cap: int) -> int:
    """The largest power of two <= cap that keeps K tiles inside one scale block."""
    for bk in (128, 64, 32, 16):
        if bk <= cap and (scale_k % bk == 0 or scale_k >= k):
            return bk
    raise ValueError(f"fp8_matmul (triton): the scale block's {scale_k} columns must be a multiple of 16")


def fp8_matmul_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    split_k: int | None = None,  # None: chosen from the shape; tests force values
    path: str | None = None,  # None: by M; "fused" or "dequant" forces a path (benchmarks, tests)
    native: bool | None = None,  # None: by the device's capability; tests force either decoder
) -> torch.Tensor:  # [M, N]
    """Launcher: checks, picks the path, tiles and the e4m3 decoder, allocates the output."""
    m, n, k = _check(x, weight, scale, block, bias)
    if triton is None:
        raise RuntimeError("fp8_matmul: triton is not installed")
    x = x.contiguous()
    native = native_fp8(x.device) if native is None else native
    w = weight.view(torch.float8_e4m3fn) if native else weight.view(torch.uint8)
    path = path or ("dequant" if m >= LARGE_M else "fused")
    if path == "dequant":
        return _dequant_matmul(x, w, scale, block, bias, native)
    if path != "fused":
        raise ValueError(f"fp8_matmul: path {path!r} is not 'fused' or 'dequant'")
    if m <= SMALL_M:  # decode: one row block; split K until the weight streams from every SM
        block_m, block_n, cap, warps, stages, waves = 16, 64, 128, 4, 3, 4
    elif m <= 64:
        block_m, block_n, cap, warps, stages, waves = 64, 128, 64, 4, 4, 2
    else:
        block_m, block_n, cap, warps, stages, waves = 128, 128, 64, 8, 3, 2
    block_k = _block_k(block[1], k, cap)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = split_k or max(1, min(steps, triton.cdiv(waves * num_sms(x.device), tiles)))
    k_per_split = triton.cdiv(steps, split) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty slices
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _fp8_matmul_kernel[grid](
        x, w, scale, bias if bias is not None else scale, out,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        SCALE_N=block[0], SCALE_K=block[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split, HAS_BIAS=bias is not None, NATIVE_FP8=native,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )
    return out.to(x.dtype) if split > 1 else out


def fp8_dequantize_triton(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
                          native: bool | None = None) -> torch.Tensor:  # W [N, K] in dtype
    n, k = weight.shape
    native = native_fp8(weight.device) if native is None else native
    w = weight.view(torch.float8_e4m3fn) if native else weight.view(torch.uint8)
    out = torch.empty((n, k), device=weight.device, dtype=dtype)
    block_n, block_k = 64, 64
    _fp8_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        w, scale, out, n, k, w.stride(0), w.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1), SCALE_N=block[0], SCALE_K=block[1], BLOCK_N=block_n, BLOCK_K=block_k,
        NATIVE_FP8=native, num_warps=4,
    )
    return out


def _dequant_matmul(x, weight, scale, block, bias, native) -> torch.Tensor:
    """Prefill: dequantize row chunks of W (whole scale blocks) and let cuBLAS multiply."""
    n, k = weight.shape
    bn = block[0]
    rows = max(bn, DEQUANT_CHUNK_ELEMS // k // bn * bn)  # a multiple of the scale block's rows
    parts = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = fp8_dequantize_triton(weight[r0:r1], scale[r0 // bn:-(-r1 // bn)], block, x.dtype, native)  # [r, K]
        parts.append(torch.nn.functional.linear(x, w, bias[r0:r1] if bias is not None else None))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ---------------------------------------------------------------- dispatch


def fp8_matmul(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # float8_e4m3fn [N, K]
    scale: torch.Tensor,  # float32 [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int],
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """The one entry point: Triton where `use_triton`, else the reference."""
    if use_triton(x.device):
        return fp8_matmul_triton(x, weight, scale, block, bias)
    return fp8_matmul_ref(x, weight, scale, block, bias)
