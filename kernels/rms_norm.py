"""RMSNorm of rows, optionally after a residual add, in one launch: a Triton kernel and its torch reference.

The norms of a Qwen decoder layer, computed as transformers does
(models/qwen2/modeling_qwen2.py Qwen2RMSNorm; models/qwen3_next/modeling_qwen3_next.py
Qwen3NextRMSNorm for the zero-centred form):

    plain:         y = weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)      (Qwen2, Qwen3)
    zero-centred:  y = (x * rsqrt(mean(x^2) + eps) * (1 + weight)).to(dtype) (Qwen3-Next, Qwen3.5)

the mean and rsqrt in fp32. With a residual, x is first replaced by s = x + residual rounded to
the activation dtype (the decoder layer's `x + attn(...)`), and s is returned beside y: one
kernel instead of the add and the norm's six element-wise ops.

    rms_norm(x, weight, eps, zero_centered=False)                 -> y          [..., D]
    add_rms_norm(x, residual, weight, eps, zero_centered=False)   -> (y, s)     [..., D] each

x: fp16/bf16/fp32 [A, D] or [A, B, D] with a contiguous last axis (other strides free, so a
head view of a merged q/k/v output needs no copy); residual alike and of x's shape; weight [D].
y and s are new contiguous tensors in x.dtype. The Triton kernel rounds where torch rounds: s is
the same bits on both paths, y differs only by the order of the sum of squares (an ulp). `use_triton` picks the path.
"""

from __future__ import annotations

import torch

from . import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    """Shapes and dtypes (no device sync). Raises ValueError naming the argument."""
    if x.dim() not in (2, 3) or x.dtype not in _FLOAT_DTYPES or x.stride(-1) != 1:
        raise ValueError(f"rms_norm: x must be fp16/bf16/fp32 [A, D] or [A, B, D] with a contiguous last axis, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"rms_norm: residual must be {x.dtype} {tuple(x.shape)} with a contiguous last axis, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    if tuple(weight.shape) != (x.shape[-1],) or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rms_norm: weight must be [D={x.shape[-1]}], got {weight.dtype} {tuple(weight.shape)}")
    if not x.device == weight.device == (x.device if residual is None else residual.device):
        raise ValueError("rms_norm: x, residual and weight must be on one device")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """Plain torch (the CPU path and the oracle): see the module docstring. Returns y in x.dtype
    (a plain norm with weights of another dtype promotes, as transformers does)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     zero_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_ref(x + residual), x + residual)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps, zero_centered), s


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, B, D, sx0, sx1, sr0, sr1, eps,
                         HAS_RESIDUAL: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one row of D values: x[a, b, :]
        a, b = row // B, row % B
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(x_ptr + a * sx0 + b * sx1 + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + a * sr0 + b * sr1 + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(y_ptr.dtype.element_ty)  # rounded as torch's add
            tl.store(s_ptr + row * D + offs, x, mask=mask)
        xf = x.to(tl.float32)
        normed = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            y = normed * (1.0 + w)
        else:
            y = normed.to(y_ptr.dtype.element_ty).to(tl.float32) * w  # cast back first, then the weight
        tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if triton is None:
        raise RuntimeError("rms_norm: Triton is not installed")
    _check(x, residual, weight)
    if not zero_centered and weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: the Triton path takes a plain norm's weight in x's dtype {x.dtype}, "
                         f"got {weight.dtype}")
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [A, B, D]
    r3 = None if residual is None else (residual if residual.dim() == 3 else residual.unsqueeze(1))
    a, b, d = x3.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    s = torch.empty_like(y) if residual is not None else None
    if a * b == 0:
        return y, s
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(a * b,)](
        x3, r3 if r3 is not None else x3, weight, y, s if s is not None else y, b, d,
        x3.stride(0), x3.stride(1), r3.stride(0) if r3 is not None else 0, r3.stride(1) if r3 is not None else 0,
        float(eps), HAS_RESIDUAL=residual is not None, ZERO_CENTERED=zero_centered, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return y, s


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """The Triton kernel (see the module docstring). Raises ValueError on bad shapes or dtypes."""
    return _launch(x, None, weight, eps, zero_centered)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        zero_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel with the residual add fused. Raises ValueError on bad shapes or dtypes."""
    y, s = _launch(x, residual, weight, eps, zero_centered)
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """The one entry point: Triton where `use_triton`, else the reference."""
    if use_triton(x.device):
        return rms_norm_triton(x, weight, eps, zero_centered)
    return rms_norm_ref(x, weight, eps, zero_centered)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): Triton where `use_triton`, else the reference."""
    if use_triton(x.device):
        return add_rms_norm_triton(x, residual, weight, eps, zero_centered)
    return add_rms_norm_ref(x, residual, weight, eps, zero_centered)
