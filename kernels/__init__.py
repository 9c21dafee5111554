"""pprt_kernels: Triton kernels, each beside a pure-torch reference.

Every kernel module holds a private `@triton.jit` kernel, a launcher that
checks shapes/dtypes/strides and allocates the output, and `<name>_ref`, a
plain torch function of the same signature (the CPU path and the test oracle).

`use_triton(device)` is the one dispatch point. The environment variable
PPRT_KERNELS selects the implementation for a whole run: "triton" or "ref";
unset means Triton on CUDA and the reference elsewhere. With
`PPRT_KERNELS=triton TRITON_INTERPRET=1` the Triton kernels run on CPU.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("triton", "ref")


def kernel_choice() -> str | None:
    """The PPRT_KERNELS setting, validated; None when unset."""
    value = os.environ.get("PPRT_KERNELS", "").strip().lower()
    if not value:
        return None
    if value not in _CHOICES:
        raise ValueError(f"PPRT_KERNELS={value!r} is not one of {', '.join(_CHOICES)}")
    return value


def use_triton(device: torch.device | str) -> bool:
    """True when the Triton kernel should run for tensors on `device`."""
    choice = kernel_choice()
    if choice is not None:
        return choice == "triton"
    return torch.device(device).type == "cuda"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter (small grids that
    still exercise split-K and several partitions)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
