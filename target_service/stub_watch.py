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
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("specrec.target.stub_watch")
STUB = "triton_python_backend_stub"
PROC = Path("/proc")


def stub_pids(shm_prefix: str, server_pid: int | None = None) -> set[int]:
    """Live (not zombie) stub processes of one Triton: its children named like a stub, or any process whose
    command line carries its Python-backend shm prefix (Triton passes each stub its shm region name).

    Both, because each alone missed a live stub in some runs here; the command line also finds orphans.
    """
    pids: set[int] = set()
    try:
        names = os.listdir(PROC)
    except OSError as e:
        log.warning("cannot list %s: %s", PROC, e)
        return pids
    wanted = (STUB.encode(), shm_prefix.encode())
    for name in names:  # not Path.glob: one unreadable entry there ends the whole listing silently
        if not name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split at the last ')'
            head, tail = (PROC / name / "stat").read_bytes().rsplit(b")", 1)
            state, ppid = tail.split()[:2]
            if state == b"Z":
                continue
            child = server_pid is not None and int(ppid) == server_pid and STUB[:15].encode() in head
            if child or all(w in (PROC / name / "cmdline").read_bytes() for w in wanted):
                pids.add(int(name))
        except (OSError, ValueError, IndexError):
            continue  # the process exited while we looked
    return pids


class StubWatch(threading.Thread):
    """Calls `on_loss(reason)` once when fewer stubs are alive than the most seen so far."""

    def __init__(self, shm_prefix: str, on_loss: Callable[[str], None], interval_s: float = 0.5,
                 server_pid: int | None = None):
        super().__init__(name="stub-watch", daemon=True)
        self.shm_prefix = shm_prefix
        self.server_pid = server_pid
        self.on_loss = on_loss
        self.interval_s = interval_s
        self._halt = threading.Event()

    def run(self) -> None:
        seen = len(stub_pids(self.shm_prefix, self.server_pid))
        log.info("watching %d Python backend stub process(es) (shm prefix %s)", seen, self.shm_prefix)
        polls = 0
        while not self._halt.wait(self.interval_s):
            t0 = time.monotonic()
            alive = len(stub_pids(self.shm_prefix, self.server_pid))
            polls += 1
            if polls in (1, 10, 100):  # evidence, should a loss ever go unseen
                log.info("stub watch poll %d: %d alive (scan %.3f s)", polls, alive, time.monotonic() - t0)
            if alive != seen:
                log.info("%d Python backend stub process(es) alive, %d before", alive, seen)
            if alive < seen:
                self.on_loss(f"{seen - alive} of {seen} Python backend stub processes died")
                return
            seen = max(seen, alive)

    def stop(self) -> None:
        self._halt.set()
