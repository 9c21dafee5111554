"""Expert weights of one MoE layer, stacked along a leading expert dim, in the formats the kernels read.

One projection of E experts, W_e [N, K] (N = out, K = in), y = x @ W_e^T:
    FLOAT  weight [E, N, K] in the activation dtype (Qwen3.5-MoE's file layout)
    INT4   pprt's Int4 format (pprt/weights/int4.py) per expert, stacked:
           weight int32 [E, K/8, N], scales [E, K/g, N] in the activation dtype,
           zeros uint8 [E, K/g, N], perm int64 [E, K] or None (GPTQ desc_act:
           expert e reads x[:, perm[e]])
    FP8    pprt's FP8 format (pprt/weights/fp8.py) per expert, stacked:
           weight float8_e4m3fn (or its uint8 bits) [E, N, K], scales float32
           [E, parts * ceil(N/parts/bn), ceil(K/bk)] for a block (bn, bk)
A layer has two: gate_up (N = 2I: gate's I rows, then up's, as Qwen3.5-MoE
stores `gate_up_proj`; K = H) and down (N = H, K = I). Stacking gate and up
concatenates along N: Int4 scales and zeros with their columns; FP8 scale rows
part by part (`parts` = 2), so a block never spans gate and up even when I is
not a multiple of bn. `check_moe_args` checks a call's operands against each
other. This module holds no kernels and knows nothing of models.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from pprt_kernels.fp8_matmul import fp8_dequantize_ref
from pprt_kernels.int4_matmul import int4_dequantize_ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8)


class ExpertFormat(enum.Enum):
    FLOAT = "float"
    INT4 = "int4"
    FP8 = "fp8"


@dataclass(slots=True)
class ExpertWeights:
    """One projection of E experts, stacked: y = x @ W_e^T with W_e [N, K] (layouts in the module docstring)."""

    format: ExpertFormat
    weight: torch.Tensor  # FLOAT [E, N, K]; INT4 int32 [E, K/8, N]; FP8 [E, N, K]
    scales: torch.Tensor | None = None  # INT4 [E, K/g, N]; FP8 float32 [E, parts * ceil(N/parts/bn), ceil(K/bk)]
    zeros: torch.Tensor | None = None  # INT4 uint8 [E, K/g, N]
    group_size: int = 0  # INT4
    perm: torch.Tensor | None = None  # INT4 int64 [E, K]: expert e reads x[:, perm[e]]
    block: tuple[int, int] = (0, 0)  # FP8 (bn, bk)
    parts: int = 1  # FP8: equal parts stacked along N, each with its own scale rows

    def __post_init__(self) -> None:
        w = self.weight
        if w.dim() != 3:
            raise ValueError(f"ExpertWeights.weight must be 3-D (experts first), got {tuple(w.shape)}")
        if self.format is ExpertFormat.FLOAT:
            if w.dtype not in _FLOAT_DTYPES or any(t is not None for t in (self.scales, self.zeros, self.perm)):
                raise ValueError(f"ExpertWeights(FLOAT) takes one float [E, N, K] weight, got {w.dtype}")
            return
        if self.format is ExpertFormat.FP8:
            self._check_fp8()
            return
        if self.format is not ExpertFormat.INT4:
            raise ValueError(f"ExpertWeights: unknown format {self.format!r}")
        e, k, n, g = w.shape[0], w.shape[1] * 8, w.shape[2], self.group_size
        if w.dtype != torch.int32 or g <= 0 or g % 8 or k % g:
            raise ValueError(f"ExpertWeights(INT4): weight must be int32 [E, K/8, N] and group_size ({g}) a "
                             f"multiple of 8 dividing K = {k}, got {w.dtype} {tuple(w.shape)}")
        groups = (e, k // g, n)
        s, z = self.scales, self.zeros
        if s is None or s.dtype not in _FLOAT_DTYPES or tuple(s.shape) != groups:
            raise ValueError(f"ExpertWeights(INT4): scales must be float {list(groups)}, got "
                             f"{None if s is None else (s.dtype, tuple(s.shape))}")
        if z is None or z.dtype != torch.uint8 or tuple(z.shape) != groups:
            raise ValueError(f"ExpertWeights(INT4): zeros must be uint8 {list(groups)}, got "
                             f"{None if z is None else (z.dtype, tuple(z.shape))}")
        if self.perm is not None and (self.perm.dtype != torch.int64 or tuple(self.perm.shape) != (e, k)):
            raise ValueError(f"ExpertWeights(INT4): perm must be int64 [{e}, {k}], got "
                             f"{self.perm.dtype} {tuple(self.perm.shape)}")

    def _check_fp8(self) -> None:
        w, s = self.weight, self.scales
        e, n, k = w.shape
        bn, bk = self.block = (int(self.block[0]), int(self.block[1]))
        if w.dtype not in _FP8_DTYPES or bn <= 0 or bk <= 0 or self.parts <= 0 or n % self.parts:
            raise ValueError(f"ExpertWeights(FP8): weight must be float8_e4m3fn (or uint8 bits) [E, N, K] with a "
                             f"positive block and N divisible into {self.parts} parts, got {w.dtype} "
                             f"{tuple(w.shape)}, block {self.block}")
        rows = (e, self.parts * self.scale_rows_per_part, -(-k // bk))
        if s is None or s.dtype != torch.float32 or tuple(s.shape) != rows or self.zeros is not None \
                or self.perm is not None:
            raise ValueError(f"ExpertWeights(FP8): scales must be float32 {list(rows)}, got "
                             f"{None if s is None else (s.dtype, tuple(s.shape))}")

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 8 if self.format is ExpertFormat.INT4 else self.weight.shape[2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[2] if self.format is ExpertFormat.INT4 else self.weight.shape[1]

    @property
    def scale_rows_per_part(self) -> int:
        """FP8: scale rows of one of the `parts` stacked along N."""
        return -(-self.out_features // self.parts // self.block[0])

    @property
    def act_dtype(self) -> torch.dtype | None:
        """The activation dtype these weights multiply (float weights' or Int4 scales'); None for FP8 (any)."""
        return {ExpertFormat.FLOAT: self.weight.dtype, ExpertFormat.INT4: getattr(self.scales, "dtype", None)}.get(
            self.format)

    def dense(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """W_e [N, K] in fp32, each element rounded to `dtype` as the kernels dequantize it (the reference's view)."""
        if self.format is ExpertFormat.FLOAT:
            return self.weight[expert].float()
        if self.format is ExpertFormat.FP8:
            n_part, r = self.out_features // self.parts, self.scale_rows_per_part
            return torch.cat([fp8_dequantize_ref(self.weight[expert, p * n_part:(p + 1) * n_part],
                                                 self.scales[expert, p * r:(p + 1) * r], self.block, dtype)
                              for p in range(self.parts)]).float()
        w_t = int4_dequantize_ref(self.weight[expert], self.scales[expert], self.zeros[expert], self.group_size)
        if self.perm is not None:  # stored row k of W^T is row perm[k] of the original
            w_t = torch.empty_like(w_t).index_copy_(0, self.perm[expert], w_t)
        return w_t.float().t()


def check_moe_args(x, weights, ids, gate_up: ExpertWeights, down: ExpertWeights) -> tuple[int, int, int]:
    """(T, H, I) after checking every shape and dtype against the others."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused_moe: x must be a float [T, H] tensor, got {x.dtype} {tuple(x.shape)}")
    t, h = x.shape
    i = down.in_features
    e = gate_up.num_experts
    if (gate_up.in_features, gate_up.out_features) != (h, 2 * i) or down.out_features != h:
        raise ValueError(f"fused_moe: gate_up must map H={h} to 2I and down I to H; got gate_up "
                         f"{gate_up.in_features}->{gate_up.out_features}, down {i}->{down.out_features}")
    if down.num_experts != e:
        raise ValueError(f"fused_moe: gate_up has {e} experts, down {down.num_experts}")
    for name, w in (("gate_up", gate_up), ("down", down)):
        if w.act_dtype not in (None, x.dtype) or w.weight.device != x.device:
            raise ValueError(f"fused_moe: {name} weights are {w.act_dtype} on {w.weight.device}, "
                             f"x is {x.dtype} on {x.device}")
    if ids.dim() != 2 or ids.shape[0] != t or ids.dtype != torch.int32 or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"fused_moe: routing must be weights and int32 ids of shape [T={t}, k], got "
                         f"{tuple(weights.shape)} and {ids.dtype} {tuple(ids.shape)}")
    return t, h, i
