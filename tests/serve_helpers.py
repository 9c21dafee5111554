"""Start `python -m pprt.serve` as its own process on a free loopback port, as a user would.

`running_server(*args)` yields the base URL once the server prints the line it
prints when it listens, and stops the server afterwards (SIGTERM, then SIGKILL),
checking that none of its processes is left. Its stderr goes to a file that a
failure shows.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def _env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO),
                CUDA_VISIBLE_DEVICES="", PYTHONIOENCODING="utf-8")


@contextlib.contextmanager
def running_server(*args: str, log: Path):
    """Yield (base_url, process) of a server started with `args` (after `--port 0`)."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pprt.serve", "--port", "0", *args], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the server did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            if line.startswith("pprt.serve: serving "):
                yield line.rsplit(" at ", 1)[1].strip(), proc
                break
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a clean shutdown), SIGKILL after 30 s; then no process of its group may be left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the server (pid {proc.pid}) left processes behind after it exited")


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out
