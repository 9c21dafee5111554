"""One stage program as the driver sees it: start it, talk to it, and tell whether and how it failed.

A stage is started as its own Python program (`python -m
pprt.distributed.stage_main FD`, in its own session, stdin closed), so it
never imports the caller's main module. FD is its end of a socket pair; the
driver keeps the other end as a `multiprocessing.connection.Connection`
(length-prefixed pickles). The socket is the stage's lifeline both ways: when
the stage dies the driver reads EOF at once, and when the driver dies the
stage does (stage_main.SocketControl).

Liveness: the driver pings a stage it has not heard from for a while (only
while it waits on the stages) and the stage's reader thread answers at once,
even in the middle of a long step. A stage that leaves a ping unanswered for
`stage_timeout` seconds, or does not take a message off its socket for that
long, has stopped (SIGSTOP, a frozen machine) and is reported as hung.

What a `StageProcess` records about a failure is a `Fault`; which stage the
pipeline blames when several report is pipeline.py's decision.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from .stage_main import PING
from .step import Heartbeat, StageError
from .worker import StageBoot

STARTUP_TIMEOUT_S = 120.0  # from start to the stage's first heartbeat (Python and torch import)
EXIT_WAIT_S = 5.0  # how long to wait for the exit status of a stage whose socket closed
_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the pprt package


class Fault(enum.Enum):
    """How a stage failed, as far as the driver can tell."""

    REPORTED = "reported"  # it raised and sent its StageError
    GONE = "gone"  # its socket closed without a report: the process died
    HUNG = "hung"  # it stopped answering (no heartbeat, or its socket stayed full) past the deadline
    PEER = "peer"  # it raised while sending to or receiving from a neighbour: likely that one's fault


class StageProcess:
    """A started stage program and the driver's end of its socket."""

    def __init__(self, boot: StageBoot, stage_timeout: float):
        self.index, self.spec = boot.stage, boot.spec
        self.stage_timeout = stage_timeout
        ours, theirs = socket.socketpair()
        # A send that makes no progress for stage_timeout fails (BlockingIOError) instead of
        # hanging: a stopped stage no longer empties its socket.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(stage_timeout),
                                                                          int(stage_timeout % 1 * 1e6)))
        try:
            self.proc = subprocess.Popen(_command(theirs.fileno()), pass_fds=(theirs.fileno(),), env=_environment(),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         start_new_session=True)  # Ctrl-C at a terminal reaches the driver only
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.started_at = time.monotonic()
        self.heard_at: float | None = None  # last message of any kind (None: not started yet)
        self.ping_since: float | None = None  # when the unanswered ping was sent
        self.fault: Fault | None = None
        self.fault_detail = ""
        self.closed = False  # its socket reached EOF
        self.send(pickle.dumps(boot))

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.spec.device}, layers {self.spec.layers})"

    # ---- talking ----------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Write one message; False (and the fault recorded) when the stage cannot take it."""
        if self.fault is not None:
            return False
        try:
            self.conn.send_bytes(data)
            return True
        except BlockingIOError:
            self._set_fault(Fault.HUNG, f"its socket stayed full for stage_timeout = {self.stage_timeout:g} s "
                                        "(it stopped taking messages)")
        except OSError:
            self._set_fault(Fault.GONE)
        return False

    def read(self) -> list:
        """Every message that has arrived (heartbeats and errors are recorded, not returned)."""
        out = []
        try:
            while not self.closed and self.conn.poll(0):
                msg = self.conn.recv()
                self.heard_at, self.ping_since = time.monotonic(), None
                if isinstance(msg, StageError):
                    self._set_fault(Fault.PEER if msg.peer else Fault.REPORTED, msg.message)
                elif not isinstance(msg, Heartbeat):
                    out.append(msg)
        except (EOFError, OSError):
            self.closed = True
            self._set_fault(Fault.GONE)
        return out

    # ---- liveness -----------------------------------------------------------------------------
    def ping_interval(self) -> float:
        return min(1.0, self.stage_timeout / 4)

    def check(self, now: float) -> None:
        """Ping the stage when it has been quiet; record HUNG when it let a deadline pass."""
        if self.fault is not None:
            return
        if self.heard_at is None:
            if now - self.started_at > STARTUP_TIMEOUT_S:
                self._set_fault(Fault.HUNG, f"it did not start within {STARTUP_TIMEOUT_S:g} s")
        elif self.ping_since is None:
            if now - self.heard_at >= self.ping_interval():
                self.ping_since = now
                self.send(PING.encode())
        elif now - self.ping_since >= self.stage_timeout:
            self._set_fault(Fault.HUNG, f"no answer to a heartbeat for {now - self.ping_since:.1f} s "
                                        f"(stage_timeout = {self.stage_timeout:g} s)")

    def next_check(self) -> float:
        """When `check` has something to do next (monotonic seconds)."""
        if self.heard_at is None:
            return self.started_at + STARTUP_TIMEOUT_S
        if self.ping_since is None:
            return self.heard_at + self.ping_interval()
        return self.ping_since + self.stage_timeout

    # ---- failure -------------------------------------------------------------------------------
    def _set_fault(self, fault: Fault, detail: str = "") -> None:
        if self.fault is None or self.fault is Fault.PEER and fault is Fault.REPORTED:
            self.fault, self.fault_detail = fault, detail

    def describe(self) -> str:
        """What happened to this stage, for the StageFailed message."""
        if self.fault in (Fault.REPORTED, Fault.PEER):
            return f"{self.name} failed: {self.fault_detail}"
        if self.fault is Fault.HUNG:
            return (f"{self.name} stopped responding: {self.fault_detail}; "
                    f"process {self.proc.pid} is {_state(self.proc.pid)}")
        try:
            code = self.proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return (f"{self.name} closed its connection to the driver but process {self.proc.pid} is still "
                    f"{_state(self.proc.pid)}")
        if code < 0:
            return f"{self.name} died (killed by signal {-code}, {signal.Signals(-code).name})"
        return f"{self.name} died (exit code {code})"

    def kill(self) -> None:
        """End the process now (also a stopped one) and wait for it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass


def _command(fd: int) -> list[str]:
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # keep the working directory off sys.path
    return [sys.executable, *safe_path, "-m", "pprt.distributed.stage_main", str(fd)]


def _environment() -> dict[str, str]:
    """The caller's environment, with this pprt first on the path: the stage runs the same code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible sleep", "T": "stopped", "t": "stopped by a tracer",
           "Z": "a zombie (exited)", "X": "dead"}


def _state(pid: int) -> str:
    """A process's scheduler state from /proc ("stopped" for SIGSTOP), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            letter = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return _STATES.get(letter, f"in state {letter}")
