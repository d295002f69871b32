"""The session table: a cap on live sessions and the raw counters the Stats RPC reports.

A session lives exactly as long as its Speculate stream: the stream's handler takes a slot when the
client opens a session and gives it back in a `finally` block, so a closed, failed, idle-expired or
vanished stream frees its slot the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

from specrec.draft.v1 import draft_pb2


class SessionLimit(Exception):
    """No free session slot."""


@dataclass
class Counters:
    """Monotonic counts since start; rates and ratios belong in PromQL."""

    sessions_opened: int = 0
    sessions_rejected: int = 0
    sessions_expired: int = 0
    trees_drafted: int = 0
    draft_ahead_hits: int = 0
    draft_ahead_misses: int = 0
    draft_ahead_misses_by_reason: dict[str, int] = field(default_factory=dict)
    invalid_requests: int = 0


class SessionTable:
    """Slots for live sessions (all on the server's event loop, so no lock is needed)."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self.counters = Counters()
        self._live: set[int] = set()
        self._ids = itertools.count(1)

    @property
    def live(self) -> int:
        return len(self._live)

    def acquire(self) -> int:
        """A session id, or SessionLimit when max_sessions are live."""
        if len(self._live) >= self.max_sessions:
            self.counters.sessions_rejected += 1
            raise SessionLimit(f"{len(self._live)} sessions are live, the server's cap "
                               f"(SPECREC_DRAFT_MAX_SESSIONS={self.max_sessions}); retry later or plain-decode")
        sid = next(self._ids)
        self._live.add(sid)
        self.counters.sessions_opened += 1
        return sid

    def release(self, sid: int) -> None:
        self._live.discard(sid)

    def stats(self) -> draft_pb2.StatsResponse:
        counts = {f.name: getattr(self.counters, f.name) for f in fields(self.counters)}
        return draft_pb2.StatsResponse(live_sessions=self.live, max_sessions=self.max_sessions, **counts)
