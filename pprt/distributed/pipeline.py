"""PipelineExecutor: one spawned process per stage, driven from this process.

The driver pickles each step plan once and writes it to every stage's pipe;
stage 0 embeds and runs its layers and sends the hidden states on (comm.py);
the last stage answers on its pipe with the sampled tokens. Up to one
micro-batch per stage is in flight.

The driver never polls: it blocks in `multiprocessing.connection.wait` on the
pipes and on the processes' sentinels together, so a stage that raises (its
StageError arrives on its pipe) or dies (its sentinel fires) becomes an error
here at once, naming the stage and the cause. Stages die with the driver
(PR_SET_PDEATHSIG), ignore Ctrl-C (the driver closes them), and `close()`
ends them: first politely, then by force.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import weakref
from collections import deque
from multiprocessing.connection import wait

from ..errors import StageFailed
from .comm import free_port
from .stage_main import CLOSE, STATS, serve_spawned
from .step import PoolSizes, StageError, StageReady, StageCounters, StepPlan, StepResult
from .worker import WorkerSpec, peak_rss_bytes

JOIN_TIMEOUT_S = 5.0


class PipelineExecutor:
    def __init__(self, specs: list[WorkerSpec], transport: str, pools: PoolSizes, threads: int | None = None):
        self.specs, self.depth = specs, len(specs)
        if threads is None and all(s.device == "cpu" for s in specs):
            threads = max(1, (os.cpu_count() or 1) // len(specs))  # stages share the cores
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.conns, self.procs = [], []
        self._inbox: list[deque] = [deque() for _ in specs]
        for i, spec in enumerate(specs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve_spawned, name=f"pprt-stage{i}", daemon=True,
                               args=(i, len(specs), spec, transport, init_method, child, pools, threads))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        try:
            _take_load_report(self, [self._receive(i, StageReady) for i in range(len(specs))])
            for conn in self.conns:
                conn.send(self.pools)
            _take_pool_bytes(self, [self._receive(i, tuple) for i in range(len(specs))])
        except BaseException:
            self.close()
            raise

    def submit(self, plan: StepPlan) -> None:
        data = pickle.dumps(plan)
        for i, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except OSError:
                self._raise_failure(i)

    def result(self) -> StepResult:
        return self._receive(len(self.specs) - 1, StepResult)

    def stats(self) -> list[StageCounters]:
        for conn in self.conns:
            conn.send_bytes(STATS.encode())
        return [self._receive(i, StageCounters) for i in range(len(self.specs))]

    def close(self) -> None:
        self._finalizer()

    def _receive(self, stage: int, kind: type):
        """The oldest message of type `kind` from `stage`, while watching every stage for errors and deaths."""
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        while not any(isinstance(m, kind) for m in self._inbox[stage]):
            for obj in wait(self.conns + list(sentinels)):
                if obj in sentinels:
                    self._raise_failure(sentinels[obj])
                i = self.conns.index(obj)
                try:
                    msg = obj.recv()
                except (EOFError, OSError):
                    self._raise_failure(i)
                if isinstance(msg, StageError):
                    raise StageFailed(f"stage {i} ({self.specs[i].device}, layers {self.specs[i].layers}) "
                                      f"failed: {msg.message}")
                self._inbox[i].append(msg)
        # Step results and control replies (stats) may interleave: take the oldest of `kind`.
        msg = next(m for m in self._inbox[stage] if isinstance(m, kind))
        self._inbox[stage].remove(msg)
        return msg

    def _raise_failure(self, stage: int) -> None:
        conn = self.conns[stage]
        try:  # a stage that raised sends its error before it exits
            while conn.poll(0.5):
                msg = conn.recv()
                if isinstance(msg, StageError):
                    raise StageFailed(f"stage {stage} ({self.specs[stage].device}, layers "
                                      f"{self.specs[stage].layers}) failed: {msg.message}")
        except (EOFError, OSError):
            pass
        proc = self.procs[stage]
        proc.join(JOIN_TIMEOUT_S)
        code = proc.exitcode
        cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise StageFailed(f"stage {stage} ({self.specs[stage].device}, layers {self.specs[stage].layers}) "
                          f"died ({cause})")


def _take_load_report(executor, readies: list[StageReady]) -> None:
    """What every executor tells about its loaded stages; each pool is the smallest stage's."""
    executor.pools = PoolSizes(min(r.num_blocks for r in readies), min(r.num_slots for r in readies))
    executor.num_blocks, executor.num_slots = executor.pools.blocks, executor.pools.slots
    executor.weight_bytes = [r.weight_bytes for r in readies]
    executor.load_seconds = max(r.load_seconds for r in readies)
    executor.load_rss_bytes = [r.load_rss_bytes for r in readies]
    executor.quant_seconds = max(r.quant_seconds for r in readies)


def _take_pool_bytes(executor, sizes: list[tuple[int, int]]) -> None:
    """Each stage's (KV pool, state pool) bytes as allocated."""
    executor.kv_bytes = [kv for kv, _ in sizes]
    executor.state_bytes = [state for _, state in sizes]


def _shutdown(procs: list, conns: list) -> None:
    """Ask every stage to leave, then end those that do not."""
    for conn in conns:
        try:
            conn.send_bytes(CLOSE.encode())
        except OSError:
            pass
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(JOIN_TIMEOUT_S)
    for conn in conns:
        conn.close()


class TorchrunExecutor:
    """Rank 0 under torchrun: the driver and stage 0 in one process.

    The other ranks run `pprt.distributed.stage_main.serve_torchrun()`; rank 0 sends each its
    WorkerSpec, then every step plan, over torch.distributed (asynchronously,
    so rank 0 computes stage 0 of the next micro-batch while later stages work).
    A failing rank reports a StageError; a stuck one surfaces through the
    group's timeout.
    """

    def __init__(self, specs: list[WorkerSpec], transport: str, pools: PoolSizes):
        from .comm import ActivationChannel, ObjectChannel, init_group
        from .worker import Worker, worker_pools

        self.specs, self.depth = specs, len(specs)
        self._failed = False
        init_group(0, len(specs), transport, specs[0].device)
        self.objects = ObjectChannel()
        for rank in range(1, len(specs)):
            self.objects.send((specs[rank], pools), rank)
        self.worker = Worker(specs[0])
        self.channel = ActivationChannel(0, len(specs), self.worker.device, transport)
        room = worker_pools(self.worker, pools)
        readies = [StageReady(0, room.blocks, self.worker.weight_bytes(), self.worker.load_seconds,
                              self.worker.load_rss_bytes, self.worker.quant_seconds, room.slots)]
        readies += [self._receive(rank, StageReady) for rank in range(1, len(specs))]
        _take_load_report(self, readies)
        for rank in range(1, len(specs)):
            self.objects.send(self.pools, rank)
        self.worker.allocate_cache(self.pools)
        _take_pool_bytes(self, [self.worker.pool_bytes] + [self._receive(r, tuple) for r in range(1, len(specs))])

    def submit(self, plan: StepPlan) -> None:
        hidden = self.worker.execute(plan)  # first: if stage 0 fails, no rank waits for this step
        for rank in range(1, len(self.specs)):
            self.objects.send(plan, rank)  # before the activation: both travel 0 -> 1 in order
        self.channel.send(hidden)

    def result(self) -> StepResult:
        return self._receive(len(self.specs) - 1, StepResult)

    def stats(self) -> list[StageCounters]:
        for rank in range(1, len(self.specs)):
            self.objects.send(STATS, rank)
        own = StageCounters(0, self.worker.busy_seconds, self.channel.wait_seconds, -1, peak_rss_bytes(),
                         self.worker.peak_device_bytes())
        return [own] + [self._receive(rank, StageCounters) for rank in range(1, len(self.specs))]

    def close(self) -> None:
        import torch.distributed as dist

        if self.worker is None:
            return
        self.worker = None
        if not self._failed:  # after a failure a peer may never receive: do not wait on it
            for rank in range(1, len(self.specs)):
                self.objects.send(CLOSE, rank)
            self.channel.flush()
            self.objects.flush()
        dist.destroy_process_group()

    def _receive(self, rank: int, kind: type):
        try:
            msg = self.objects.recv(rank)
        except Exception as e:  # a dead or stuck rank: gloo reports it (at the latest at the group timeout)
            self._failed = True
            raise StageFailed(f"stage {rank} (torchrun rank {rank}) stopped answering: {e}") from e
        if isinstance(msg, StageError):
            self._failed = True
            raise StageFailed(f"stage {rank} (torchrun rank {rank}, layers {self.specs[rank].layers}) failed: "
                              f"{msg.message}")
        if not isinstance(msg, kind):
            raise StageFailed(f"stage {rank} answered {type(msg).__name__}, expected {kind.__name__}")
        return msg
