"""Watch tritonserver's Python-backend stub processes and report when one dies.

Triton 2.51 does not restart a stub that was killed (OOM killer, kill -9) and no health endpoint shows
it: the server and the model stay READY while every request fails INTERNAL "Stub process ... is not
healthy" (tests/chaos/test_chaos_target_killed.py). The launcher therefore treats a lost stub as a
dead server: it kills Triton and exits, so its supervisor (Kubernetes, LocalStack) starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("specrec.target.stub_watch")
STUB = "triton_python_backend_stub"
PROC = Path("/proc")


def stub_pids(server_pid: int) -> set[int]:
    """Live (not zombie) stub processes whose parent is `server_pid`; empty where /proc is missing."""
    pids = set()
    try:
        names = os.listdir(PROC)
    except OSError:
        return pids
    for name in names:  # not Path.glob: one unreadable entry there ends the whole listing silently
        if not name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
            state, ppid = (PROC / name / "stat").read_bytes().decode(errors="replace").rsplit(")", 1)[1].split()[:2]
            if int(ppid) == server_pid and state != "Z" and STUB.encode() in (PROC / name / "cmdline").read_bytes():
                pids.add(int(name))
        except (OSError, ValueError, IndexError):
            continue  # the process exited while we looked
    return pids


class StubWatch(threading.Thread):
    """Calls `on_loss(reason)` once when fewer stubs are alive than the most seen so far."""

    def __init__(self, server_pid: int, on_loss: Callable[[str], None], interval_s: float = 0.5):
        super().__init__(name="stub-watch", daemon=True)
        self.server_pid = server_pid
        self.on_loss = on_loss
        self.interval_s = interval_s
        self._halt = threading.Event()

    def run(self) -> None:
        seen = len(stub_pids(self.server_pid))
        log.info("watching %d Python backend stub process(es) of tritonserver pid %d", seen, self.server_pid)
        while not self._halt.wait(self.interval_s):
            alive = len(stub_pids(self.server_pid))
            if alive != seen:
                log.info("%d Python backend stub process(es) alive, %d before", alive, seen)
            if alive < seen:
                self.on_loss(f"{seen - alive} of {seen} Python backend stub processes died")
                return
            seen = max(seen, alive)

    def stop(self) -> None:
        self._halt.set()
