"""pprt's FP8 weight format (W8A16); import of the official FP8 checkpoints; quantize-at-load.

The format (`Fp8Weight`), for a linear layer y = x @ W^T with W [N, K]
(N = out_features, K = in_features) and a scale block (bn, bk):

    weight float8_e4m3fn [N, K]                  as stored
    scale  float32 [ceil(N/bn), ceil(K/bk)]      one per block; the last blocks may be partial

    W[n, k] = weight[n, k] * scale[n // bn, k // bk]

This is the official Qwen FP8 layout (`weight` + `weight_scale_inv`, block 128 x 128;
the name says inverse but it multiplies: shared/QWEN.md section 8). Per-channel scales
are block (1, K) and a per-tensor scale is block (N, K), so compressed-tensors'
float-quantized files (weights/compressed.py) map onto the same format.
Bytes per layer: N*K + ceil(N/bn)*ceil(K/bk)*4 (about half of bf16).

`quantize_fp8` is quantize-at-load (quant="fp8"): per block, scale = max|w| / 448 (the
largest e4m3 value) and weight = round-to-nearest e4m3 of w / scale, as the official
files are made (DeepSeek-V3 / Qwen FP8 recipe), on the weight's own device.
`Fp8Linear` is the module the model uses; its forward goes through
pprt_kernels.fp8_matmul (Triton on CUDA, torch on CPU). `load_fp8_rows` reads one expert's
projection out of a fused FP8 expert tensor (`gate_up_proj` [E, 2I, H] with scales over the
joined rows), so fused and per-expert files end in the same per-expert layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import pprt_kernels.fp8_matmul as fp8_kernels  # by attribute: a test may reload it under TRITON_INTERPRET

from ..quantization import FP8_BLOCK, FP8_MAX, ModuleFormat

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(slots=True)
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int]  # (bn, bk)

    def __post_init__(self) -> None:
        w, s = self.weight, self.scale
        if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
            raise ValueError(f"Fp8Weight.weight must be a 2-D float8_e4m3fn [N, K] tensor, got {w.dtype} "
                             f"{tuple(w.shape)}")
        n, k = w.shape
        bn, bk = self.block = (int(self.block[0]), int(self.block[1]))
        if bn <= 0 or bk <= 0:
            raise ValueError(f"Fp8Weight.block {self.block} must be positive")
        blocks = (-(-n // bn), -(-k // bk))
        if s.dtype != torch.float32 or tuple(s.shape) != blocks:
            raise ValueError(f"Fp8Weight.scale must be float32 {list(blocks)} for weight [{n}, {k}] and block "
                             f"{self.block}, got {s.dtype} {list(s.shape)}")
        if w.device != s.device:
            raise ValueError(f"Fp8Weight tensors are on different devices: {w.device}, {s.device}")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.weight.to(device), self.scale.to(device), self.block)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> Fp8Weight:
    """Block-wise FP8 of a float weight [N, K] on its own device: scale = amax / 448 per block.

    A block of zeros gets scale 1. Works on block rows at a time, so temporaries stay near
    the size of a [bn, K] slice in fp32.
    """
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_fp8: weight must be a 2-D float [N, K] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    bn, bk = block
    kb = -(-k // bk)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=weight.device)
    scales = torch.empty(-(-n // bn), kb, dtype=torch.float32, device=weight.device)
    for i, r0 in enumerate(range(0, n, bn)):
        w = weight[r0:r0 + bn].float()  # [r, K]
        padded = torch.nn.functional.pad(w, (0, kb * bk - k)).view(w.shape[0], kb, bk)  # [r, kb, bk]
        amax = padded.abs().amax(dim=(0, 2))  # [kb]
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q[r0:r0 + bn] = (padded / scale[None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(w.shape[0], -1)[:, :k] \
            .to(torch.float8_e4m3fn)
        scales[i] = scale
    return Fp8Weight(q, scales, block)


def dequantize(w: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight W [N, K] in `dtype`."""
    return fp8_kernels.fp8_dequantize_ref(w.weight, w.scale, w.block, dtype)


class Fp8Linear(torch.nn.Module):
    """y = x @ W^T + b with W held as an Fp8Weight (buffers, so .to() moves it)."""

    def __init__(self, weight: Fp8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.weight.shape
        self.block = weight.block
        if bias is not None and (tuple(bias.shape) != (self.out_features,) or bias.dtype not in _FLOAT_DTYPES):
            raise ValueError(f"Fp8Linear: bias must be float [{self.out_features}], got {bias.dtype} "
                             f"{tuple(bias.shape)}")
        self.register_buffer("weight", weight.weight)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("bias", bias)

    @property
    def fp8_weight(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.weight_scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        lead = x.shape[:-1]
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        y = fp8_kernels.fp8_matmul(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.block, bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, " \
               f"bias={self.bias is not None}"


# ---------------------------------------------------------------- loader hooks


def expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """`t` if it has `shape` and one of `dtypes`; else ValueError naming the tensor."""
    if tuple(t.shape) != shape:
        raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"tensor {name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    return t


def read_bias(read: Callable[[str], torch.Tensor], prefix: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    return expect(read(f"{prefix}.bias"), f"{prefix}.bias", (n,), _FLOAT_DTYPES).to(dtype)


def load_fp8_linear(
    read: Callable[[str], torch.Tensor],
    prefix: str,
    in_features: int,
    out_features: int,
    has_bias: bool,
    fmt: ModuleFormat,
    dtype: torch.dtype,
    device: torch.device,
) -> Fp8Linear:
    """Read one official FP8 layer (`weight` float8_e4m3fn [N, K], `weight_scale_inv` float32
    [ceil(N/bn), ceil(K/bk)]) onto `device`. `read(name)` gives a stored tensor on `device`."""
    n, k = out_features, in_features
    block = fmt.fp8_block(n, k)
    weight = expect(read(f"{prefix}.weight"), f"{prefix}.weight", (n, k), (torch.float8_e4m3fn,))
    blocks = (-(-n // block[0]), -(-k // block[1]))
    scale = read(f"{prefix}.weight_scale_inv")
    if scale.numel() == 1 and blocks == (1, 1):  # a per-tensor scale may be stored as a scalar
        scale = scale.reshape(1, 1)
    scale = expect(scale, f"{prefix}.weight_scale_inv", blocks, (torch.float32, torch.bfloat16, torch.float16))
    bias = read_bias(read, prefix, n, dtype) if has_bias else None
    return Fp8Linear(Fp8Weight(weight, scale.float().contiguous(), block).to(device), bias)


def load_fp8_rows(
    weight: torch.Tensor,
    scale: torch.Tensor,
    row0: int,
    fused_rows: int,
    fmt: ModuleFormat,
    names: tuple[str, str],
) -> Fp8Linear:
    """One expert linear stored as rows [row0, row0 + N) of a fused FP8 expert tensor.

    The fused layout (transformers' FP8Experts, integrations/finegrained_fp8.py) stores an
    expert's joined projection W_e [fused_rows, K] (gate_up: 2I rows, gate's then up's; down:
    H rows) as float8_e4m3fn with `<name>_scale_inv` [E, ceil(fused_rows/bn), ceil(K/bk)]:
    one scale per block of the joined rows. weight: float8_e4m3fn [N, K], the part's rows of
    one expert; scale: that expert's scales [ceil(fused_rows/bn), ceil(K/bk)] (a scalar or [1]
    when the block is the whole tensor). When I is not a multiple of bn a block spans gate's
    last rows and up's first ones, so the part's scales are re-expressed, exactly, in blocks of
    g = gcd(bn, N) rows (g = bn for a whole tensor or when bn divides N): each g-row block lies
    in one stored block and takes its scale. Gate and up get the same g, so they stack
    (weights/experts.py). `names`: the two stored tensors (parts), named in the ValueError raised
    when one does not fit.
    """
    n, k = weight.shape
    bn, bk = fmt.fp8_block(fused_rows, k)
    blocks = (-(-fused_rows // bn), -(-k // bk))
    if weight.dtype != torch.float8_e4m3fn or not 0 <= row0 < row0 + n <= fused_rows:
        raise ValueError(f"tensor {names[0]} is {weight.dtype} rows [{row0}, {row0 + n}) of {fused_rows}, expected "
                         "float8_e4m3fn rows inside the fused tensor")
    if scale.numel() == 1 and blocks == (1, 1):
        scale = scale.reshape(1, 1)
    scale = expect(scale, names[1], blocks, (torch.float32, torch.bfloat16, torch.float16))
    g = bn if n == fused_rows or n % bn == 0 and row0 % bn == 0 else math.gcd(bn, n, row0)
    rows = (row0 + torch.arange(-(-n // g), device=scale.device) * g) // bn  # the stored block of each g-row block
    return Fp8Linear(Fp8Weight(weight, scale.float().index_select(0, rows).contiguous(), (g, bk)))


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int] = FP8_BLOCK) -> Fp8Linear:
    """Quantize-at-load of one float layer, on the weight's device; the bias keeps its dtype."""
    return Fp8Linear(quantize_fp8(weight, block), bias.to(weight.dtype) if bias is not None else None)
