"""The loop of a stage that runs in its own process: a program the driver starts, or a torchrun rank.

A stage loads its layers, reports `StageReady` (with the KV blocks and state
slots its memory allows), allocates the pools the driver decides, then executes
step plans until told to close: it receives the previous stage's hidden
states (comm.py, checked to be those of the step it executes), runs its
layers, and sends hidden states on, or, on the last stage, sends the
`StepResult` back to the driver.

The driver starts a stage as its own program, `python -m
pprt.distributed.stage_main FD`, never by re-importing the caller's main
module (so a script without a main guard, `python -c`, stdin and interactive
sessions all work). FD is its end of a socket to the driver: the first
message on it is the `StageBoot`. Control messages reach a stage through a
`Control`: that socket, or torch.distributed messages from rank 0 under
torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from .comm import ActivationChannel, ObjectChannel, PeerFailure, init_group
from .step import Heartbeat, PoolSizes, StageError, StageReady, StageCounters
from .worker import StageBoot, Worker, WorkerSpec, peak_rss_bytes, worker_pools

CLOSE = "close"  # control message: leave the loop
STATS = "stats"  # control message: report StageCounters
PING = "ping"  # control message (driver socket only): answer with a Heartbeat at once
_WORDS = {w.encode(): w for w in (CLOSE, STATS, PING)}
PARENT_CHECK_S = 0.5  # how often a stage checks that the driver process still exists


class SocketControl:
    """Control messages over the socket to the driver that started this stage program.

    A reader thread takes every message as it arrives: it answers a ping at once
    with a Heartbeat (so a stage deep in a long step still shows it is alive, and a
    stopped one does not), queues the rest for the stage loop (plans arrive pickled
    once), and ends the process when the driver is gone (the socket closes, or this
    process gets another parent).
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self._send_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.send(Heartbeat())  # started: from now on the driver expects answers to its pings
        threading.Thread(target=self._read, name="pprt-control", daemon=True).start()

    def recv(self):
        msg = self._inbox.get()
        if isinstance(msg, BaseException):
            raise msg
        return msg

    def send(self, obj) -> None:
        with self._send_lock:
            self.conn.send(obj)

    def _read(self) -> None:
        parent = os.getppid()
        while True:
            try:
                while not self.conn.poll(PARENT_CHECK_S):
                    if os.getppid() != parent:
                        os._exit(1)  # the driver died (its socket may live on in a forked child of it)
                data = self.conn.recv_bytes()
                word = _WORDS.get(data)
                if word == PING:
                    self.send(Heartbeat())
                    continue
                msg = word if word is not None else pickle.loads(data)
            except (EOFError, OSError):
                os._exit(1)  # the driver is gone: nothing else ends this process
            except Exception as e:  # a message that does not unpickle: the stage loop reports it
                msg = e
            self._inbox.put(msg)


class DistControl:
    """Control messages from and to rank 0 over torch.distributed (torchrun)."""

    def __init__(self, objects: ObjectChannel):
        self.objects = objects

    def recv(self):
        return self.objects.recv(0)

    def send(self, obj) -> None:
        self.objects.send(obj, 0)


def run_stage(stage: int, world: int, spec: WorkerSpec, transport: str, control, pools: PoolSizes) -> None:
    """Load, report, then execute plans from `control` until it says close."""
    worker = Worker(spec)
    channel = ActivationChannel(stage, world, worker.device, transport)
    room = worker_pools(worker, pools)
    control.send(StageReady(stage, room.blocks, worker.weight_bytes(), worker.load_seconds,
                            worker.load_rss_bytes, worker.quant_seconds, room.slots, room.snapshots))
    worker.allocate_cache(control.recv())
    control.send(worker.pool_bytes)  # the pools as allocated (KV with fp8 scales, state)
    steps = 0
    while True:
        msg = control.recv()
        if msg == CLOSE:
            break
        if msg == STATS:
            control.send(StageCounters(stage, worker.busy_seconds, channel.wait_seconds, steps, peak_rss_bytes(),
                                       worker.peak_device_bytes()))
            continue
        x = None
        if not worker.stage.is_first:
            x = channel.recv(msg.step, (msg.num_tokens, spec.config.hidden_size), spec.dtype)
        out = worker.execute(msg, x)
        steps += 1
        if worker.stage.is_last:
            control.send(out)
        else:
            channel.send(msg.step, out)
    channel.flush()  # only on a clean close: after a failure a peer may never receive


def stage_error(stage: int, e: BaseException) -> StageError:
    return StageError(stage, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", peer=isinstance(e, PeerFailure))


def main() -> None:
    """The stage program started by PipelineExecutor: `python -m pprt.distributed.stage_main FD`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it closes the stages
    control = SocketControl(Connection(int(sys.argv[1])))
    boot: StageBoot = control.recv()
    code = 0
    try:
        if boot.threads:
            torch.set_num_threads(boot.threads)
        init_group(boot.stage, boot.world, boot.transport, boot.spec.device, boot.init_method, boot.group_timeout_s)
        run_stage(boot.stage, boot.world, boot.spec, boot.transport, control, boot.pools)
    except BaseException as e:  # report, then exit
        code = 1
        try:
            control.send(stage_error(boot.stage, e))
        except OSError:
            pass
    # Leave at once: a process group with transfers in flight (after a failure) can hold
    # up the interpreter's exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- torchrun ---------------------------------------------------------------------------

def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several torchrun ranks, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def local_device() -> str:
    """This rank's device: cuda:LOCAL_RANK when CUDA is visible, else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def torchrun_transport() -> str:
    """The transport every rank uses: PPRT_TRANSPORT (same on all ranks), else NCCL on CUDA, gloo on CPU."""
    transport = os.environ.get("PPRT_TRANSPORT") or ("nccl" if torch.cuda.is_available() else "gloo")
    if transport not in ("nccl", "gloo", "host"):
        raise ValueError(f"PPRT_TRANSPORT={transport!r} is not one of nccl, gloo, host")
    return transport


def serve_torchrun() -> None:
    """Run this torchrun rank (rank > 0) as a pipeline stage until rank 0's LLM closes.

    Rank 0 sends this rank its WorkerSpec (layers, dtype, ...); the device is this
    rank's own (cuda:LOCAL_RANK, or cpu).
    """
    rank_world = torchrun_rank()
    if rank_world is None or rank_world[0] == 0:
        raise RuntimeError("serve_torchrun() is for torchrun ranks other than 0")
    rank, world = rank_world
    transport = torchrun_transport()
    init_group(rank, world, transport, local_device())
    objects = ObjectChannel()
    try:
        spec, pools = objects.recv(0)
        spec = dataclasses.replace(spec, device=local_device())
        run_stage(rank, world, spec, transport, DistControl(objects), pools)
    except BaseException as e:
        objects.send(stage_error(rank, e), 0)
        raise
    finally:
        objects.flush()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
