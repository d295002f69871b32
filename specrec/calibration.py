"""How often verification accepts a drafted path of probability q: f(q), learnt from counts per log-q bin.

The adaptive policy sizes rounds with it (orchestrator side); the draft service ranks its draft-ahead guesses with
it. The drafters are far from calibrated: on the bench profile paths the drafter gives q ~ 0.05 were accepted 38%
of the time, q ~ 0.003 19% (chains of 15, 48 held-out users).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

# Log q bins: N_BINS equal bins over [LOGQ_MIN, 0) plus a last "sure" bin for paths of q ~ 1 (grammar-forced
# tokens count q = 1), which verification accepts whenever their parent is.
N_BINS = 12
LOGQ_MIN = -8.0
SURE_LOGQ = -1e-3
LOWER_EDGES = np.append(np.linspace(LOGQ_MIN, 0.0, N_BINS + 1)[:-1], SURE_LOGQ)  # [N_BINS + 1]
BIN_Q = np.append(np.exp(LOWER_EDGES[:-1] + 0.5 * (-LOGQ_MIN / N_BINS)), 0.99)  # bin centres, the prior for f
_LOG_BIN_Q = np.log(BIN_Q)


def logq_bin(logq: Any) -> Any:
    """Bin index of log q values (clamped below LOGQ_MIN)."""
    x = np.asarray(logq, dtype=float)
    b = np.clip(np.floor((x - LOGQ_MIN) / (-LOGQ_MIN / N_BINS)), 0, N_BINS - 1).astype(int)
    return np.where(x >= SURE_LOGQ, N_BINS, b)


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted pool-adjacent-violators: the closest non-decreasing sequence to y."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, _, n in blocks])


class Calibration:
    """f(q) = P(node accepted | path prob q): Beta-prior counts per log-q bin, monotone in q.

    Pooled over slots and depths: q already carries what the drafter knows about the slot and the depth, and
    pooling keeps every bin's estimate backed by data. The prior is the drafter taken at its word (f = q).
    Safe to share between threads (the draft service's sessions record from its pool).

    `pessimism` z > 0 reads each bin as its posterior mean less z standard deviations: for a source whose nodes
    must prove themselves before they displace another's (the hybrid's pool), a bin backed by few trials counts low.
    """

    def __init__(self, strength: float = 4.0, pessimism: float = 0.0):
        self.hits = np.zeros(N_BINS + 1)
        self.trials = np.zeros(N_BINS + 1)
        self.strength = strength
        self.pessimism = pessimism
        self._f: np.ndarray | None = None
        self._lock = threading.Lock()

    def record(self, path_logq: Sequence[float], node_accepted: Sequence[bool],
               depths: Sequence[int] | None = None) -> None:
        """Count nodes by their path's log q: accepted or not (`depths` is for DepthCalibration; pooled here)."""
        bins = logq_bin(path_logq)
        with self._lock:
            np.add.at(self.trials, bins, 1.0)
            np.add.at(self.hits, bins, np.asarray(node_accepted, dtype=float))
            self._f = None

    def scale(self, factor: float) -> None:
        with self._lock:
            self.hits *= factor
            self.trials *= factor
            self._f = None

    def table(self) -> np.ndarray:
        """f per bin, shape [N_BINS + 1], non-decreasing."""
        f = self._f
        if f is None:
            with self._lock:
                k = self.strength
                raw = (self.hits + k * BIN_Q) / (self.trials + k)
                if self.pessimism:
                    sd = np.sqrt(raw * (1.0 - raw) / (self.trials + k + 1.0))
                    raw = np.maximum(raw - self.pessimism * sd, 1e-6)
                f = self._f = _isotonic(raw, self.trials + k)
        return f

    def __call__(self, q: float) -> float:
        return float(self.table()[int(logq_bin(math.log(max(q, 1e-300))))])

    def accepted(self, logq: float) -> float:
        """f at a path's log q, interpolated between bin centres in log q: with no counts yet this is ~q
        itself, so ranking by it starts out as ranking by the drafter's own q."""
        return float(np.interp(logq, _LOG_BIN_Q, self.table()))

    def accepted_at(self, logq: float, depth: int) -> float:
        """f for a path of log q at this depth: pooled over depths here (see DepthCalibration)."""
        return self.accepted(logq)


class DepthCalibration:
    """f(q) learnt apart for each path depth (deeper than MAX_DEPTH: pooled with it), for scores that do not carry
    the depth: a retrieval pool scores a run of any length by its match frequency, so its nodes at depth 1 and 8
    share q; and merging two sources' trees compares their nodes depth by depth."""

    MAX_DEPTH = 16

    def __init__(self, strength: float = 4.0, pessimism: float = 0.0):
        self.by_depth = [Calibration(strength, pessimism) for _ in range(self.MAX_DEPTH + 1)]

    def record(self, path_logq: Sequence[float], node_accepted: Sequence[bool],
               depths: Sequence[int] | None = None) -> None:
        if depths is None:
            raise ValueError("DepthCalibration needs each node's depth")
        d = np.minimum(np.asarray(depths, dtype=int), self.MAX_DEPTH)
        q, ok = np.asarray(path_logq, dtype=float), np.asarray(node_accepted, dtype=bool)
        for depth in np.unique(d).tolist():
            self.by_depth[depth].record(q[d == depth], ok[d == depth])

    def accepted_at(self, logq: float, depth: int) -> float:
        return self.by_depth[min(depth, self.MAX_DEPTH)].accepted(logq)

    def log_accepted(self, logq: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """log f_d(q) for paths of log q `logq` [n] and lengths `depths` [n] (vectorised accepted_at)."""
        d = np.minimum(depths, self.MAX_DEPTH)
        out = np.empty(len(logq))
        for depth in np.unique(d).tolist():
            at = d == depth
            out[at] = np.interp(logq[at], _LOG_BIN_Q, self.by_depth[depth].table())
        return np.log(np.maximum(out, 1e-12))
