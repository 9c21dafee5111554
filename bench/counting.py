"""Count, on any device, the kernel launches and device-to-host syncs a piece of code would cause on a GPU.

`with count_ops() as counts: ...` records
- every aten op that would launch a kernel (views, allocations and other
  metadata-only ops are left out), via a TorchDispatchMode;
- every Triton kernel launch (compiled or under TRITON_INTERPRET), via the
  kernels' `run`; the aten ops the interpreter itself runs are not counted;
- every op that makes a CUDA host wait for the device: reading a value
  (`item`, `bool`, `int`, `tolist`), ops whose output size depends on the
  data (`nonzero`, `unique`, `bincount`, `masked_select`, boolean indexing,
  `repeat_interleave` without `output_size`) and copies from a device to the CPU.
On CPU nothing actually waits; the counts say what the same code does on a GPU.
This is a measuring tool for tests and benchmarks: it patches Triton's launch
methods and `Tensor.tolist` only inside the `with` block.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

# ops that only allocate or describe memory (no kernel)
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default, aten.sym_size.int,
    aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_same_size.default,
    aten.resize_.default,
}
# ops whose result size, or value on the host, needs the device's data
_SYNC_PACKETS = {
    aten._local_scalar_dense, aten.nonzero, aten.unique_dim, aten._unique, aten._unique2, aten.unique_consecutive,
    aten.bincount, aten.masked_select,
}


@dataclass
class OpCounts:
    launches: int = 0  # aten kernels + Triton kernels
    triton_launches: int = 0
    syncs: int = 0
    ops: Counter = field(default_factory=Counter)  # name -> count, launches and syncs
    sync_ops: Counter = field(default_factory=Counter)


def _is_sync(func, args, kwargs) -> bool:
    if func.overloadpacket in _SYNC_PACKETS:
        return True
    if func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None \
            and isinstance(args[0], torch.Tensor):
        return True
    if func.overloadpacket is aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
        return True
    if func.overloadpacket in (aten._to_copy, aten.copy_):  # device -> host
        src = args[1] if func.overloadpacket is aten.copy_ else args[0]
        dst = args[0].device if func.overloadpacket is aten.copy_ else kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
            and torch.device(dst).type == "cpu"
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts
        self.paused = 0  # inside a Triton launch (the interpreter's own tensor work)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = str(func.overloadpacket).split(".")[-1]
            if _is_sync(func, args, kwargs):
                self.counts.syncs += 1
                self.counts.sync_ops[name] += 1
            if func not in _NO_KERNEL and not func.is_view and func.overloadpacket is not aten._local_scalar_dense:
                self.counts.launches += 1
                self.counts.ops[name] += 1
        return func(*args, **kwargs)


def _launch_classes() -> list[type]:
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    counts = OpCounts()
    mode = _Mode(counts)
    patched = []

    def wrap(run):
        def counted_run(self, *args, **kwargs):
            counts.launches += 1
            counts.triton_launches += 1
            counts.ops[f"triton:{getattr(self, '__name__', 'kernel')}"] += 1
            mode.paused += 1
            try:
                with _disable_current_modes():  # the interpreter's own tensor work is not the kernel's
                    return run(self, *args, **kwargs)
            finally:
                mode.paused -= 1
        return counted_run

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if not mode.paused and self.device.type == "cpu":  # a device tensor's copy to the host counts already
            counts.syncs += 1
            counts.sync_ops["tolist"] += 1
        return tolist(self)

    for cls in _launch_classes():
        patched.append((cls, cls.run))
        cls.run = wrap(cls.run)
    torch.Tensor.tolist = counted_tolist
    try:
        with mode:
            yield counts
    finally:
        torch.Tensor.tolist = tolist
        for cls, run in patched:
            cls.run = run
