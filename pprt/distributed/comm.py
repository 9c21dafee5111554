"""Moving activations between stages, and control messages under torchrun.

Stages form one torch.distributed group, rank = stage index. Hidden states
[T, H] go from rank r to r + 1 with point-to-point send/recv, behind a small
header that names their step (the receiver checks it against the plan it
executes, and knows T from that plan). Transports:

- "nccl": device tensors over NCCL (GPU peer-to-peer or NCCL's own staging);
- "gloo": CPU tensors over gloo (CPU stages);
- "host": device -> pinned host buffer -> gloo -> host -> device, for machines
  where GPU peer-to-peer over PCIe hangs; it also lets two stages share a GPU.

Sends are asynchronous (isend), so a stage starts its next micro-batch while
the previous one is still leaving it. Every blocking operation has the
group's timeout, so a stuck peer becomes an error instead of a hang.
Knows nothing about model math.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import time
from collections import deque

import torch
import torch.distributed as dist

TRANSPORTS = ("nccl", "gloo", "host")
DEFAULT_TIMEOUT_S = 120.0


def choose_transport(devices: list[str], requested: str = "auto") -> str:
    """The transport for a pipeline over `devices` ("auto": NCCL between distinct GPUs, else host/gloo)."""
    kinds = {torch.device(d).type for d in devices}
    if requested == "auto":
        if kinds == {"cpu"}:
            return "gloo"
        if kinds == {"cuda"} and len(set(devices)) == len(devices):
            return "nccl"
        return "host"
    if requested not in TRANSPORTS:
        raise ValueError(f"transport {requested!r} is not one of auto, {', '.join(TRANSPORTS)}")
    if requested == "nccl" and kinds != {"cuda"}:
        raise ValueError("transport 'nccl' needs every stage on a CUDA device")
    if requested == "nccl" and len(set(devices)) != len(devices):
        raise ValueError("transport 'nccl' cannot join two stages on one GPU; use transport='host'")
    if requested == "gloo" and kinds != {"cpu"}:
        raise ValueError("transport 'gloo' moves CPU tensors; use 'host' for CUDA stages")
    return requested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, transport: str, device: str, init_method: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the stages' process group (env:// under torchrun when init_method is None).

    A CUDA stage first makes its GPU the current device, so NCCL's communicator (and
    any stray default-device allocation) lands on it rather than on cuda:0.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    backend = "cpu:gloo,cuda:nccl" if transport == "nccl" else "gloo"
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


class PeerFailure(RuntimeError):
    """Sending to or receiving from a neighbouring stage failed: most likely that stage failed first."""


class OutOfStep(RuntimeError):
    """A stage received the activations of another step than the one it executes."""


class ActivationChannel:
    """Hidden states between this stage (rank) and its neighbours, each tagged with its step.

    Every transfer is a header `[step, rows]` (int64, on the host, so over gloo even
    in an NCCL group) followed by the hidden states `[rows, H]`. The receiver checks
    the header against the plan it executes: activations of another step (the
    stages out of step) raise `OutOfStep` instead of being computed on silently.
    """

    MAX_PENDING = 4  # steps whose sends are in flight before the oldest is awaited

    def __init__(self, rank: int, world: int, device: torch.device, transport: str):
        self.rank, self.world, self.device, self.transport = rank, world, device, transport
        self._pending: deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = deque()
        self.wait_seconds = 0.0  # time spent blocked in recv (not computing)

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor that goes over the wire for `x`."""
        if self.transport == "host" and x.device.type != "cpu":
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            buf.copy_(x, non_blocking=True)
            torch.cuda.current_stream(x.device).synchronize()
            return buf
        return x.contiguous()

    def send(self, step: int, x: torch.Tensor) -> None:
        """Send step `step`'s hidden states `x` [rows, H] to the next stage without waiting for it."""
        while len(self._pending) >= self.MAX_PENDING:
            self._wait_oldest()
        header = torch.tensor([step, x.shape[0]], dtype=torch.int64)
        wire = self._wire(x)
        try:
            works = [dist.isend(header, self.rank + 1), dist.isend(wire, self.rank + 1)]
        except RuntimeError as e:
            raise PeerFailure(f"sending activations to stage {self.rank + 1} failed: {e}") from e
        self._pending.append((works, (header, wire)))

    def recv(self, step: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Receive the previous stage's hidden states of step `step` (shape [rows, H]).

        Raises OutOfStep when the previous stage sent another step's, PeerFailure when the
        transfer itself fails (that stage died, or the group's timeout passed).
        """
        header = torch.empty(2, dtype=torch.int64)
        t0 = time.perf_counter()
        self._recv(header)
        sent_step, rows = header.tolist()
        if sent_step != step:
            raise OutOfStep(f"stage {self.rank} executes step {step} but stage {self.rank - 1} sent the "
                            f"activations of step {sent_step}: the stages are out of step")
        if rows != shape[0]:
            raise OutOfStep(f"stage {self.rank - 1} sent {rows} rows for step {step}, whose plan has {shape[0]} tokens")
        on_host = self.transport in ("host", "gloo")
        buf = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device,
                          pin_memory=on_host and self.device.type == "cuda")
        self._recv(buf)
        self.wait_seconds += time.perf_counter() - t0
        return buf.to(self.device, non_blocking=True) if buf.device != self.device else buf

    def _recv(self, buf: torch.Tensor) -> None:
        try:
            dist.recv(buf, self.rank - 1)
        except RuntimeError as e:
            raise PeerFailure(f"receiving activations from stage {self.rank - 1} failed: {e}") from e

    def _wait_oldest(self) -> None:
        works, _ = self._pending.popleft()
        try:
            for work in works:
                work.wait()
        except RuntimeError as e:
            raise PeerFailure(f"sending activations to stage {self.rank + 1} failed: {e}") from e

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()


class ObjectChannel:
    """Control messages (step plans, results) between ranks over gloo, sent asynchronously.

    Used under torchrun, where the driver's step plans reach the other ranks
    through torch.distributed instead of pipes. Each object travels as a size
    and a pickled byte tensor; sends do not wait for the receiver.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def send(self, obj, dst: int) -> None:
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self._pending.append((dist.isend(size, dst), size))
        self._pending.append((dist.isend(data, dst), data))

    def recv(self, src: int):
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src)
        return pickle.loads(data.numpy().tobytes())

    def flush(self) -> None:
        while self._pending:
            self._pending.popleft()[0].wait()
