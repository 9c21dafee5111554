"""TorchrunExecutor: rank 0 of a torchrun job drives the pipeline and runs stage 0 itself.

Under torchrun every rank is a stage (each on its own device, possibly on
other hosts); the other ranks run `stage_main.serve_torchrun()`. Step plans
and replies travel over torch.distributed (ObjectChannel), activations over
the same ActivationChannel as spawned stages. A rank that raises reports a
StageError; a dead or stuck one surfaces through the process group's timeout
(there is no heartbeat across hosts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import StageFailed
from .comm import ActivationChannel, ObjectChannel, init_group
from .pipeline import interrupts_deferred
from .stage_main import CLOSE, STATS
from .step import (PoolSizes, StageCounters, StageError, StageReady, StepPlan, StepResult, take_load_report,
                   take_pool_bytes)
from .worker import Worker, WorkerSpec, peak_rss_bytes, worker_pools


class TorchrunExecutor:
    """Rank 0 under torchrun: the driver and stage 0 in one process.

    The other ranks run `pprt.distributed.stage_main.serve_torchrun()`; rank 0 sends each its
    WorkerSpec, then every step plan, over torch.distributed (asynchronously,
    so rank 0 computes stage 0 of the next micro-batch while later stages work).
    A failing rank reports a StageError; a stuck one surfaces through the
    group's timeout.
    """

    def __init__(self, specs: list[WorkerSpec], transport: str, pools: PoolSizes):
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
                              self.worker.load_rss_bytes, self.worker.quant_seconds, room.slots,
                              room.snapshots)]
        readies += [self._receive(rank, StageReady) for rank in range(1, len(specs))]
        take_load_report(self, readies)
        for rank in range(1, len(specs)):
            self.objects.send(self.pools, rank)
        self.worker.allocate_cache(self.pools)
        take_pool_bytes(self, [self.worker.pool_bytes] + [self._receive(r, tuple) for r in range(1, len(specs))])

    def bind_thread(self) -> None:
        """Make stage 0's GPU the calling thread's current device (the engine loop's thread)."""
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)

    def submit(self, plan: StepPlan) -> None:
        hidden = self.worker.execute(plan)  # first: if stage 0 fails, no rank waits for this step
        with interrupts_deferred():  # the plan goes to every rank or to none
            for rank in range(1, len(self.specs)):
                self.objects.send(plan, rank)  # before the activation: both travel 0 -> 1 in order
            self.channel.send(plan.step, hidden)

    def result(self) -> StepResult:
        return self._receive(len(self.specs) - 1, StepResult)

    def stats(self) -> list[StageCounters]:
        for rank in range(1, len(self.specs)):
            self.objects.send(STATS, rank)
        own = StageCounters(0, self.worker.busy_seconds, self.channel.wait_seconds, -1, peak_rss_bytes(),
                         self.worker.peak_device_bytes())
        return [own] + [self._receive(rank, StageCounters) for rank in range(1, len(self.specs))]

    def kill(self) -> None:
        """Nothing to kill from here: the other ranks are torchrun's processes."""

    def close(self) -> None:
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
            raise StageFailed(f"stage {rank} (torchrun rank {rank}) stopped answering: {e}", stage=rank) from e
        if isinstance(msg, StageError):
            self._failed = True
            raise StageFailed(f"stage {rank} (torchrun rank {rank}, layers {self.specs[rank].layers}) failed: "
                              f"{msg.message}", stage=rank)
        if not isinstance(msg, kind):
            raise StageFailed(f"stage {rank} answered {type(msg).__name__}, expected {kind.__name__}", stage=rank)
        return msg
