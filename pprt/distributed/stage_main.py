"""The loop of a stage that runs in its own process: spawned by the driver, or a torchrun rank.

A stage loads its layers, reports `StageReady` (with the KV blocks and state
slots its memory allows), allocates the pools the driver decides, then executes
step plans until told to close: it receives the previous stage's hidden
states (comm.py), runs its layers, and sends hidden states on, or, on the
last stage, sends the `StepResult` back to the driver.

Control messages reach a stage through a `Control`: a pipe from the spawning
driver, or torch.distributed messages from rank 0 under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .comm import ActivationChannel, ObjectChannel, init_group
from .step import PoolSizes, StageError, StageReady, StageCounters
from .worker import Worker, WorkerSpec, peak_rss_bytes, worker_pools

CLOSE = "close"  # control message: leave the loop
STATS = "stats"  # control message: report StageCounters


class PipeControl:
    """Control messages over the pipe from a spawning driver (plans arrive pickled once)."""

    def __init__(self, conn):
        self.conn = conn

    def recv(self):
        data = self.conn.recv_bytes()
        return data.decode() if data in (CLOSE.encode(), STATS.encode()) else pickle.loads(data)

    def send(self, obj) -> None:
        self.conn.send(obj)


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
    try:
        room = worker_pools(worker, pools)
        control.send(StageReady(stage, room.blocks, worker.weight_bytes(), worker.load_seconds,
                                worker.load_rss_bytes, worker.quant_seconds, room.slots))
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
                x = channel.recv((msg.num_tokens, spec.config.hidden_size), spec.dtype)
            out = worker.execute(msg, x)
            steps += 1
            if worker.stage.is_last:
                control.send(out)
            else:
                channel.send(out)
    finally:
        channel.flush()


def serve_spawned(stage: int, world: int, spec: WorkerSpec, transport: str, init_method: str, conn,
                  pools: PoolSizes, threads: int | None) -> None:
    """Body of a stage process spawned by PipelineExecutor."""
    _die_with_parent()
    if threads:
        torch.set_num_threads(threads)
    try:
        init_group(stage, world, transport, spec.device, init_method)
        run_stage(stage, world, spec, transport, PipeControl(conn), pools)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the driver is gone: leave quietly
    except BaseException as e:  # report, then exit
        try:
            conn.send(StageError(stage, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except OSError:
            pass


def _die_with_parent() -> None:
    """Exit when the driver process dies (checked twice a second), and ignore Ctrl-C: the
    driver handles it and closes the stages. (Not PR_SET_PDEATHSIG: that fires when the
    driver's *thread* that started the stage exits, e.g. an LLM built in a worker thread.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pprt-parent-watch", daemon=True).start()


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
        objects.send(StageError(rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"), 0)
        raise
    finally:
        objects.flush()
        dist.destroy_process_group()
