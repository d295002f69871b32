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
    command line carries its Python-backend shm prefix (Triton passes each stub its shm region name; this also
    finds orphans).
    """
    try:
        names = os.listdir(PROC)  # not Path.glob: one unreadable entry there ends the whole listing silently
    except OSError as e:
        log.warning("cannot list %s: %s", PROC, e)
        return set()
    stub, prefix, comm = STUB.encode(), shm_prefix.encode(), STUB[:15].encode()
    pids = set()
    for pid in (int(n) for n in names if n.isdigit()):
        entry = _process(pid)
        if entry is None or entry[0] == b"Z":
            continue
        _, ppid, text = entry
        if (stub in text and prefix in text) or (ppid == server_pid and comm in text):
            pids.add(pid)
    return pids


def dead_stub_pids(server_pid: int) -> set[int]:
    """Stub children of the server that died and were never reaped (Triton does not reap a killed stub).

    A stub may die before the watch's first look (it starts once the launcher sees Triton ready, which can
    be seconds after clients do): the count of live stubs then never drops, but the zombie stays.
    """
    return {pid for pid in _children(server_pid)
            if (entry := _process(pid)) is not None and entry[0] == b"Z" and STUB[:15].encode() in entry[2]}


def _process(pid: int) -> tuple[bytes, int, bytes] | None:
    """(state, ppid, comm + command line) of a process, None if it is gone."""
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split at the last ')'
        head, tail = (PROC / str(pid) / "stat").read_bytes().rsplit(b")", 1)
        state, ppid = tail.split()[:2]
        return state, int(ppid), head + b" " + (PROC / str(pid) / "cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None  # the process exited while we looked


def _children(pid: int) -> list[int]:
    """Children of every thread of `pid` (a child is listed under the thread that forked it)."""
    out: list[int] = []
    try:
        for task in os.listdir(PROC / str(pid) / "task"):
            try:
                out += [int(c) for c in (PROC / str(pid) / "task" / task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return out


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
        log.info("watching %d Python backend stub process(es) (shm prefix %s; server pid %s, its children %s)", seen,
                 self.shm_prefix, self.server_pid, _children(self.server_pid) if self.server_pid else "-")
        polls, dead_before = 0, set()
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
            # Unreaped on two looks in a row: not a stub on its way out of an orderly unload.
            dead = dead_stub_pids(self.server_pid) if self.server_pid else set()
            if dead & dead_before:
                self.on_loss(f"Python backend stub process(es) {sorted(dead)} died (never reaped by Triton)")
                return
            dead_before = dead

    def stop(self) -> None:
        self._halt.set()
