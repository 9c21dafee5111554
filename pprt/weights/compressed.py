"""compressed-tensors checkpoints (llm-compressor exports) into pprt's Int4 and FP8 formats.

Which modules are quantized, and how, is `pprt.quantization`'s business (config_groups
targets, ignore); this module reads one layer's tensors, as the `compressed-tensors`
library writes them (its PackedQuantizationCompressor and float/naive compressors):

pack-quantized, int 4 bits (W4A16):
    weight_packed      int32 [N, ceil(K/8)]  packed along K: nibble j (bits 4j..4j+3) of word
                                             [n, c] holds q[n, 8c + j] + 8 (q signed in -8..7)
    weight_scale       float [N, K/g] (group) or [N, 1] (channel)
    weight_zero_point  int32 [ceil(N/8), K/g | 1], packed along N the same way (zp + 8);
                       absent when symmetric (zp = 0)
    weight_shape       int [2] = (N, K)
    weight_g_idx       int [K], only in files made with actorder "group" (older releases)
    W[n, k] = (q[n, k] - zp[n, k // g]) * scale[n, k // g]
  In pprt's Int4 format the stored nibble is already q + 8 and the zero zp + 8, so the
  values carry over unchanged: only the packing direction (along K per output row there,
  words of 8 rows per column here) and the layout of scales and zeros change.

float-quantized, fp8 e4m3 (W8A16):
    weight        float8_e4m3fn [N, K]
    weight_scale  float [N, 1] (channel), [1] or [] (tensor), [ceil(N/bn), ceil(K/bk)] (block)
    W[n, k] = weight[n, k] * scale of its channel / tensor / block
  -> pprt's FP8 format with block (1, K), (N, K) or (bn, bk).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quantization import Kind, ModuleFormat
from .fp8 import Fp8Linear, Fp8Weight, expect, read_bias
from .int4 import Int4Linear, Int4Weight, pack, regroup_rows, unpack

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64, torch.int16, torch.int8)


def int4_from_packed(
    weight_packed: torch.Tensor,  # int32 [N, ceil(K/8)]
    weight_scale: torch.Tensor,  # [N, G]
    weight_zero_point: torch.Tensor | None,  # int32 [ceil(N/8), G] packed, or int8 [N, G]; None: symmetric
    in_features: int,
    group_size: int,  # 0: per channel
    dtype: torch.dtype,  # the scales' dtype (the activation dtype)
    g_idx: torch.Tensor | None = None,  # int [K]
) -> Int4Weight:
    """compressed-tensors pack-quantized int4 tensors to an Int4Weight (see the module docstring)."""
    n, k = weight_packed.shape[0], in_features
    g = group_size or k
    groups = k // g
    if k % 8 or k % g:
        raise ValueError(f"in_features {k} must be a multiple of 8 and of the group size {g} for Int4")
    q = unpack(weight_packed, dim=1)[:, :k]  # [N, K] uint8, already q + 8
    if weight_zero_point is None:
        zeros = torch.full((groups, n), 8, dtype=torch.uint8, device=q.device)
    elif weight_zero_point.dtype == torch.int32 and weight_zero_point.shape[0] == -(-n // 8):
        zeros = unpack(weight_zero_point, dim=0)[:n].t().contiguous()  # [G, N], zp + 8
    else:  # unpacked signed zero points [N, G]
        zeros = (weight_zero_point.to(torch.int32) + 8).clamp(0, 15).to(torch.uint8).t().contiguous()
    if tuple(zeros.shape) != (groups, n):
        raise ValueError(f"zero points give {list(zeros.shape)} (groups, N), expected {[groups, n]}")
    qweight, perm = regroup_rows(pack(q.t(), dim=0), g_idx, g)  # [K/8, N]
    return Int4Weight(qweight.contiguous(), weight_scale.t().to(dtype).contiguous(), zeros, g, perm)


def fp8_from_float_quantized(weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int]) -> Fp8Weight:
    """compressed-tensors float-quantized fp8 tensors to an Fp8Weight with `block` resolved for [N, K]."""
    n, k = weight.shape
    blocks = (-(-n // block[0]), -(-k // block[1]))
    scale = weight_scale.reshape(blocks) if weight_scale.numel() == blocks[0] * blocks[1] else weight_scale
    if tuple(scale.shape) != blocks:
        raise ValueError(f"weight_scale has shape {list(weight_scale.shape)}, expected {list(blocks)} for block "
                         f"{block} of [{n}, {k}]")
    return Fp8Weight(weight, scale.float().contiguous(), block)


def load_compressed_linear(
    read: Callable[[str], torch.Tensor],
    has: Callable[[str], bool],
    prefix: str,
    in_features: int,
    out_features: int,
    has_bias: bool,
    fmt: ModuleFormat,
    dtype: torch.dtype,
    device: torch.device,
) -> Int4Linear | Fp8Linear:
    """Read one compressed-tensors layer `prefix` (format `fmt`) onto `device`; ValueError names
    the tensor that does not fit. `read(name)` gives a stored tensor on `device`; `has(name)`
    says whether the file holds it."""
    n, k = out_features, in_features
    bias = read_bias(read, prefix, n, dtype) if has_bias else None
    if fmt.kind is Kind.FP8:
        weight = expect(read(f"{prefix}.weight"), f"{prefix}.weight", (n, k), (torch.float8_e4m3fn,))
        scale = read(f"{prefix}.weight_scale")
        if scale.dtype not in _FLOATS:
            raise ValueError(f"tensor {prefix}.weight_scale has dtype {scale.dtype}, expected a float")
        try:
            w = fp8_from_float_quantized(weight, scale, fmt.fp8_block(n, k))
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        return Fp8Linear(w.to(device), bias)
    shape = read(f"{prefix}.weight_shape")
    if shape.dtype not in _INTS or [int(v) for v in shape.flatten()] != [n, k]:
        raise ValueError(f"tensor {prefix}.weight_shape is {shape.tolist()}, the config expects [{n}, {k}]")
    g = fmt.group(k)
    packed = expect(read(f"{prefix}.weight_packed"), f"{prefix}.weight_packed", (n, -(-k // 8)), (torch.int32,))
    scale = expect(read(f"{prefix}.weight_scale"), f"{prefix}.weight_scale", (n, -(-k // g)), _FLOATS)
    zero = None
    if not fmt.sym:
        zero = read(f"{prefix}.weight_zero_point")
    g_idx = read(f"{prefix}.weight_g_idx") if has(f"{prefix}.weight_g_idx") else None
    try:
        w = int4_from_packed(packed, scale, zero, k, fmt.group_size, dtype, g_idx)
    except ValueError as e:
        raise ValueError(f"{prefix}: {e}") from None
    return Int4Linear(w.to(device), bias)
