"""Exponential noise of seeded sampling rows, every row in one launch: a Triton kernel and its torch reference.

The sampler draws a token as argmax(p / q) with q ~ Exp(1) (the exponential
race). A seeded request's q must depend on its seed alone, whatever rows share
its batch and whatever the device, so it comes from a counter-based stream:

    q[v] = -log(u),  u = ((mix64(start + (v + 1) * GOLDEN) >> 11) + 0.5) / 2**53

where mix64 is splitmix64's output function and `start` is one 64-bit state per
(seed, draw) computed on the host (`stream_start`). Source:
G. Steele, D. Lea, C. Flood, "Fast splittable pseudorandom number generators"
(OOPSLA 2014); the constants are splitmix64's. Both versions compute the same
64-bit integers (multiplications wrap modulo 2**64) and the same float64 log,
so CPU and GPU draws agree.

    seeded_noise(starts, rows, q)    q[rows[i], :] = the stream of starts[i]   (in place)

starts: int64 [S] (the 64-bit state as a signed int64); rows: int64 [S] distinct
rows of q; q: float32 [B, V], contiguous rows.
"""

from __future__ import annotations

import torch

from pprt_kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def as_int64(z: int) -> int:
    """A 64-bit pattern as torch's int64 holds it."""
    z &= 2**64 - 1
    return z - 2**64 if z >= 2**63 else z


def mix64(z: int) -> int:
    """splitmix64's output function on a 64-bit Python int."""
    z &= 2**64 - 1
    z = (z ^ (z >> 30)) * M1 & (2**64 - 1)
    z = (z ^ (z >> 27)) * M2 & (2**64 - 1)
    return z ^ (z >> 31)


def stream_start(seed: int, draw: int) -> int:
    """The state (as int64) from which draw number `draw` of `seed` counts: unrelated streams for
    distinct (seed, draw) pairs."""
    return as_int64(mix64(mix64(seed) + draw * GOLDEN))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64_ref(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function elementwise on int64 tensors (wrapping multiplications)."""
    z = (z ^ _shr(z, 30)) * as_int64(M1)
    z = (z ^ _shr(z, 27)) * as_int64(M2)
    return z ^ _shr(z, 31)


def _check(starts: torch.Tensor, rows: torch.Tensor, q: torch.Tensor) -> None:
    if starts.dtype != torch.int64 or rows.dtype != torch.int64 or starts.dim() != 1 or rows.shape != starts.shape:
        raise ValueError(f"starts and rows must be int64 [S] alike, got {starts.dtype} {tuple(starts.shape)} and "
                         f"{rows.dtype} {tuple(rows.shape)}")
    if q.dtype != torch.float32 or q.dim() != 2 or q.stride(1) != 1:
        raise ValueError(f"q must be float32 [B, V] with contiguous rows, got {q.dtype} {tuple(q.shape)}")
    if not starts.device == rows.device == q.device:
        raise ValueError("starts, rows and q must be on one device")


def seeded_noise_ref(starts: torch.Tensor, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Write the Exp(1) streams of `starts` into rows `rows` of `q` (see the module docstring); returns q."""
    _check(starts, rows, q)
    if starts.numel():
        steps = torch.arange(1, q.shape[1] + 1, dtype=torch.int64, device=q.device) * as_int64(GOLDEN)  # [V]
        z = mix64_ref(starts[:, None] + steps[None, :])  # [S, V]
        u = (_shr(z, 11).double() + 0.5) * 2.0**-53  # (0, 1)
        q.index_copy_(0, rows, (-torch.log(u)).float())
    return q


if triton is not None:

    @triton.jit
    def _noise_kernel(q, starts, rows, V, stride, BLOCK: tl.constexpr):
        """Program (seeded row i, block of columns)."""
        i = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        start = tl.load(starts + i).to(tl.uint64, bitcast=True)
        row = tl.load(rows + i)
        z = start + (cols + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        u = ((z >> 11).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)  # 2**-53
        tl.store(q + row * stride + cols, (-tl.log(u)).to(tl.float32), mask=mask)


def seeded_noise_triton(starts: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`seeded_noise_ref` in one Triton launch; returns q."""
    _check(starts, rows, q)
    S, V = starts.numel(), q.shape[1]
    if S:
        _noise_kernel[(S, triton.cdiv(V, block))](q, starts, rows, V, q.stride(0), BLOCK=block)
    return q


def seeded_noise(starts: torch.Tensor, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Dispatch: Triton when `use_triton(q.device)`, else the reference."""
    fn = seeded_noise_triton if triton is not None and use_triton(q.device) else seeded_noise_ref
    return fn(starts, rows, q)
