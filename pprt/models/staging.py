"""Host values to the device in one asynchronous copy: a byte layout of typed fields and a ring of pinned buffers.

A step needs a handful of small per-row arrays on the device (positions, slots,
sampling knobs, ...). Copying each on its own costs a launch and, from
pageable memory, may make the host wait for the stream. Instead the host
writes every field through numpy views into one staging buffer (`Layout`),
and `Uploader.upload` copies it in one go; the device-side fields are views
of the copy. On CUDA the staging buffers are pinned and used in turn (a ring
of RING): one is refilled only once the copy it last fed has run, so the host
runs at most RING uploads ahead of the device. On CPU the staging buffer is
the device buffer. Knows nothing of what the fields mean.
"""

from __future__ import annotations

import numpy as np
import torch

RING = 4  # staging buffers in flight per Uploader
_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


class Layout:
    """Byte offsets of named fields in one buffer: the fields of each dtype side by side, each
    dtype's run 8-byte aligned (so a field is a slice of one view per dtype).

    fields: (name, dtype, length); dtype int64, int32 or float32.
    """

    def __init__(self, fields: list[tuple[str, torch.dtype, int]]):
        # per dtype: (dtype, byte offset, field names, field lengths)
        self.runs: list[tuple[torch.dtype, int, list[str], list[int]]] = []
        self.spans: dict[str, tuple[int, int, int]] = {}  # name -> (run, first element, elements)
        offset = 0
        for dtype in _NUMPY:
            names = [(name, n) for name, dt, n in fields if dt == dtype]
            if not names:
                continue
            start = 0
            for name, n in names:
                self.spans[name] = (len(self.runs), start, n)
                start += n
            self.runs.append((dtype, offset, [name for name, _ in names], [n for _, n in names]))
            offset += -(-start * dtype.itemsize // 8) * 8
        for name, dtype, _ in fields:
            if dtype not in _NUMPY:
                raise ValueError(f"field {name}: dtype {dtype} is not one of {', '.join(map(str, _NUMPY))}")
        self.nbytes = max(offset, 8)

    def tensors(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields as views of `buf` (uint8, at least nbytes, on any device)."""
        out = {}
        for dt, o, names, sizes in self.runs:
            run = buf[o:o + sum(sizes) * dt.itemsize].view(dt)
            out.update(zip(names, run.split(sizes)))
        return out

    def arrays(self, buf: torch.Tensor) -> dict[str, np.ndarray]:
        """The fields as numpy views of the host buffer `buf` (for writing)."""
        raw = buf.numpy()
        runs = [raw[o:o + sum(sizes) * dt.itemsize].view(_NUMPY[dt]) for dt, o, _, sizes in self.runs]
        return {name: runs[r][i:i + n] for name, (r, i, n) in self.spans.items()}


class Uploader:
    """Staging buffers of one device (see the module docstring)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._turn = 0

    def host(self, nbytes: int) -> torch.Tensor:
        """The next staging buffer, at least `nbytes` (uint8): fill it, then `upload` it."""
        if self.device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8)
        if len(self._ring) < RING:
            self._ring.append((torch.empty(0, dtype=torch.uint8), None))
        i = self._turn = (self._turn + 1) % len(self._ring)
        buf, event = self._ring[i]
        if event is not None:
            event.synchronize()  # its copy RING uploads ago: long done unless the device lags that far
        if buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * buf.numel()), dtype=torch.uint8, pin_memory=True)
        self._ring[i] = (buf, None)
        return buf

    def upload(self, host: torch.Tensor, nbytes: int, dest: torch.Tensor | None = None) -> torch.Tensor:
        """`host[:nbytes]` (the buffer `host()` gave last) on the device, into `dest` when given."""
        if self.device.type != "cuda":
            if dest is None:
                return host[:nbytes]
            dest[:nbytes].copy_(host[:nbytes])
            return dest
        if dest is None:
            dest = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dest[:nbytes].copy_(host[:nbytes], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._ring[self._turn] = (host, event)
        return dest

    def send(self, layout: Layout, values: dict[str, object]) -> dict[str, torch.Tensor]:
        """Write `values` (name -> sequence of numbers, length as laid out) and upload them: the device fields."""
        host = self.host(layout.nbytes)
        arrays = layout.arrays(host)
        for name, v in values.items():
            arrays[name][:] = v
        return layout.tensors(self.upload(host, layout.nbytes))
