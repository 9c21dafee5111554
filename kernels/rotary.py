"""Rotary position embedding of q and k, in place, in one launch: a Triton kernel and its torch reference.

Half-split (NeoX) rotary as transformers applies it (models/qwen2/modeling_qwen2.py
`apply_rotary_pos_emb`, `rotate_half`), over the first r dims of each head (partial rotary:
Qwen3-Next and Qwen3.5 turn r = head_dim / 4 and pass the rest through):

    x1, x2 = x[..., :r/2], x[..., r/2:r]
    x[..., :r/2]  <- x1 * cos[:, :r/2] - x2 * sin[:, :r/2]
    x[..., r/2:r] <- x2 * cos[:, r/2:] + x1 * sin[:, r/2:]

each product and the sum rounded to the activation dtype, as torch's element-wise ops do, so
the Triton kernel and the reference give the same bits.

    apply_rotary(q, k, cos, sin) -> (q', k')    the Triton path turns q and k IN PLACE and returns
                                                them; the reference returns new tensors

q: [T, n, h], k: [T, m, h], fp16/bf16/fp32 of one dtype, each with a contiguous last axis (token
and head strides free: views of a merged q/k/v output need no copy); cos, sin: [T, r] in q's
dtype, r even and <= h. One launch turns every head of q and k (the reference: five or six ops per tensor). `use_triton` picks the path.
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


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shapes, dtypes and devices (no device sync). Raises ValueError naming the argument."""
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.dtype not in _FLOAT_DTYPES or x.stride(-1) != 1:
            raise ValueError(f"rotary: {name} must be fp16/bf16/fp32 [T, heads, h] with a contiguous last axis, "
                             f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    t, _, h = q.shape
    if k.shape[0] != t or k.shape[2] != h or k.dtype != q.dtype:
        raise ValueError(f"rotary: k must be {q.dtype} [T={t}, m, h={h}], got {k.dtype} {tuple(k.shape)}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.dim() != 2 or x.shape[0] != t or x.shape[1] % 2 or x.shape[1] > h or x.dtype != q.dtype:
            raise ValueError(f"rotary: {name} must be {q.dtype} [T={t}, r] with r even and <= {h}, "
                             f"got {x.dtype} {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if not q.device == k.device == cos.device == sin.device:
        raise ValueError("rotary: q, k, cos and sin must be on one device")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    half = r // 2
    rot = x[..., :r]
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (the CPU path and the oracle), out of place: the turned (q, k) as new tensors."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


if triton is not None:

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, n, sq0, sq1, sk0, sk1, sc0,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        head = tl.program_id(1)  # q's heads, then k's
        if head < n:
            base = q_ptr + t * sq0 + head * sq1
        else:
            base = k_ptr + t * sk0 + (head - n) * sk1
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        dtype = q_ptr.dtype.element_ty
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * sc0 + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * sc0 + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * sc0 + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * sc0 + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        # Round each product and the sum to the activation dtype, as torch's element-wise ops do.
        out1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
        tl.store(base + offs, out1, mask=mask)
        tl.store(base + HALF + offs, out2, mask=mask)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel: q and k turned IN PLACE and returned. Raises ValueError on bad shapes or dtypes."""
    if triton is None:
        raise RuntimeError("rotary: Triton is not installed")
    _check(q, k, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    t, n, _ = q.shape
    m = k.shape[1]
    if t == 0 or cos.shape[1] == 0:
        return q, k
    half = cos.shape[1] // 2
    _rotary_kernel[(t, n + m)](q, k, cos, sin, n, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                               HALF=half, BLOCK=triton.next_power_of_2(half))
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one entry point: Triton where `use_triton` (q and k turned in place and returned), else
    the reference (new tensors). Callers use the returned pair and no longer read the inputs."""
    if use_triton(q.device):
        return apply_rotary_triton(q, k, cos, sin)
    return apply_rotary_ref(q, k, cos, sin)
