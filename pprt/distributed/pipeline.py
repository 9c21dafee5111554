"""PipelineExecutor: one stage program per device, driven from this process.

The driver pickles each step plan once and writes it to every stage's
socket, to all stages or to none: a Ctrl-C that lands between the writes is
held back until they are done (a stage that missed a step would pair the
next step's plan with this step's activations; stages also check the step id
that travels with the activations, comm.py). Stage 0 embeds and runs its
layers and sends the hidden states on; the last stage answers on its socket
with the sampled tokens.

The driver never polls: it blocks in `multiprocessing.connection.wait` on
the stages' sockets, waking for a message or for the next liveness check
(stage_proc.py: a stage that stops answering heartbeats for `stage_timeout`
seconds is hung). When one stage fails others often fail because of it (a
neighbour that was receiving from it), so the driver listens a moment longer
and blames, in this order: a stage that raised by itself, one that died, one
that stopped responding, and only then one whose transfer to a neighbour
failed. A failed pipeline is killed at once; `close()` asks the stages to
leave, then ends those that do not.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import wait

from ..errors import StageFailed
from .comm import DEFAULT_TIMEOUT_S, free_port
from .stage_main import CLOSE, STATS
from .stage_proc import Fault, StageProcess
from .step import PoolSizes, StageCounters, StageReady, StepPlan, StepResult, take_load_report, take_pool_bytes
from .worker import StageBoot, WorkerSpec

DEFAULT_STAGE_TIMEOUT_S = 30.0  # a stage silent this long (no heartbeat) has failed
SETTLE_S = 1.0  # after a first failure, how long to listen for the stage that caused it
JOIN_TIMEOUT_S = 5.0  # close(): how long stages may take to leave before they are killed
_BLAME_ORDER = (Fault.REPORTED, Fault.GONE, Fault.HUNG, Fault.PEER)


class PipelineExecutor:
    def __init__(self, specs: list[WorkerSpec], transport: str, pools: PoolSizes, threads: int | None = None,
                 stage_timeout: float = DEFAULT_STAGE_TIMEOUT_S):
        if not stage_timeout > 0:
            raise ValueError(f"stage_timeout must be a positive number of seconds, got {stage_timeout!r}")
        self.specs, self.depth, self.stage_timeout = specs, len(specs), stage_timeout
        if threads is None and all(s.device == "cpu" for s in specs):
            threads = max(1, (os.cpu_count() or 1) // len(specs))  # stages share the cores
        init_method = f"tcp://127.0.0.1:{free_port()}"
        # A transfer between live stages may wait on a long step; a dead or stopped stage is
        # caught by the driver long before this.
        group_timeout = max(DEFAULT_TIMEOUT_S, 2 * stage_timeout)
        self.stages: list[StageProcess] = []
        self._inbox: list[deque] = [deque() for _ in specs]
        self._finalizer = weakref.finalize(self, _shutdown, self.stages)
        try:
            for i, spec in enumerate(specs):
                boot = StageBoot(i, len(specs), spec, transport, init_method, pools, threads, group_timeout)
                self.stages.append(StageProcess(boot, stage_timeout))
            take_load_report(self, [self._receive(i, StageReady) for i in range(len(specs))])
            self._send_all(pickle.dumps(self.pools))
            take_pool_bytes(self, [self._receive(i, tuple) for i in range(len(specs))])
        except BaseException:
            self.close()
            raise

    @property
    def procs(self) -> list:
        """The stage processes (subprocess.Popen), in stage order."""
        return [s.proc for s in self.stages]

    def bind_thread(self) -> None:
        """Nothing to bind: the stages run in their own processes."""

    def submit(self, plan: StepPlan) -> None:
        self._send_all(pickle.dumps(plan))  # pickled before any send: a plan that cannot be reaches no stage

    def result(self) -> StepResult:
        return self._receive(self.depth - 1, StepResult)

    def stats(self) -> list[StageCounters]:
        self._send_all(STATS.encode())
        return [self._receive(i, StageCounters) for i in range(self.depth)]

    def kill(self) -> None:
        """End every stage process now. Safe from any thread: a thread waiting on the stages
        then sees them die (and raises StageFailed)."""
        for stage in self.stages:
            stage.kill()

    def close(self) -> None:
        """Ask the stages to leave, end those that do not, and close their sockets (the owner thread only)."""
        self._finalizer()

    # ---- waiting on the stages -------------------------------------------------------------
    def _send_all(self, data: bytes) -> None:
        with interrupts_deferred():
            for stage in self.stages:
                stage.send(data)
        self._raise_on_fault()

    def _receive(self, index: int, kind: type):
        """The oldest message of type `kind` from stage `index`, while watching every stage.

        Step results and control replies (stats) may interleave: the others wait in the inbox.
        """
        inbox = self._inbox[index]
        while True:
            for msg in inbox:
                if isinstance(msg, kind):
                    inbox.remove(msg)
                    return msg
            self._wait()

    def _wait(self) -> None:
        """Block until a message arrives or a liveness check is due; raise StageFailed on a fault."""
        for stage in self.stages:  # first what came while nobody listened (a late heartbeat counts)
            self._inbox[stage.index].extend(stage.read())
        now = time.monotonic()
        for stage in self.stages:
            stage.check(now)
        self._raise_on_fault()
        timeout = max(0.0, min(s.next_check() for s in self.stages) - time.monotonic())
        by_conn = {s.conn: s for s in self.stages}
        for conn in wait(list(by_conn), timeout):
            stage = by_conn[conn]
            self._inbox[stage.index].extend(stage.read())
        self._raise_on_fault()

    def _raise_on_fault(self) -> None:
        if any(s.fault is not None for s in self.stages):
            self._fail()

    def _fail(self) -> None:
        """Name the stage that failed (listening up to SETTLE_S for the cause), end them all, raise."""
        deadline = time.monotonic() + SETTLE_S
        while not any(s.fault in (Fault.REPORTED, Fault.GONE, Fault.HUNG) for s in self.stages):
            listening = {s.conn: s for s in self.stages if not s.closed}
            left = deadline - time.monotonic()
            if left <= 0 or not listening:
                break
            for conn in wait(list(listening), left):
                listening[conn].read()
        culprit = min((s for s in self.stages if s.fault is not None),
                      key=lambda s: (_BLAME_ORDER.index(s.fault), s.index))
        message = culprit.describe()
        self.kill()
        self.close()
        raise StageFailed(message, stage=culprit.index)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it.

    Python runs signal handlers in the main thread only: in other threads there is
    nothing to hold back and this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler installed outside Python, which could not be put back)
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])  # the default handler raises KeyboardInterrupt here
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _shutdown(stages: list[StageProcess]) -> None:
    """Ask every stage to leave, then end those that do not, and close the sockets."""
    for stage in stages:
        stage.send(CLOSE.encode())
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for stage in stages:
        with contextlib.suppress(Exception):
            stage.proc.wait(max(0.0, deadline - time.monotonic()))
    for stage in stages:
        stage.kill()
        stage.conn.close()
