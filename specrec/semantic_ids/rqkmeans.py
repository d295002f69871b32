"""Residual k-means (RQ-KMeans): k-means on item vectors, then on each level's residuals.

Assignment is balanced inside each group of items that share the earlier codes (each code takes at
most ceil(group / k) of them), so near-identical items -- e.g. rarely rated ones -- still spread out
and few items need the collision level.
"""

from __future__ import annotations

import numpy as np
import torch

STALLED = 0.1  # a proposal round that places fewer than this share of the unassigned items hands over to code by code
FIT_SAMPLE = 65_536  # points k-means fits its centroids on (all of them below this): seeding costs n x k^2


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. x: [n, d]. Returns centroids [k, d]. Past FIT_SAMPLE points the
    centroids are fit on a random sample of that size (every point is still assigned, by the caller)."""
    if x.shape[0] > FIT_SAMPLE:
        x = x[torch.randperm(x.shape[0], generator=generator)[:FIT_SAMPLE]]
    n = x.shape[0]
    k = min(k, n)
    centroids = x[torch.randint(n, (1,), generator=generator)]
    nearest = torch.cdist(x, centroids).squeeze(1)  # distance to the nearest seed so far: one new column per seed
    for _ in range(1, k):  # k-means++: next seed drawn proportional to squared distance
        d2 = nearest.pow(2)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        seed = x[torch.multinomial(probs, 1, generator=generator)]
        centroids = torch.cat([centroids, seed])
        nearest = torch.minimum(nearest, torch.cdist(x, seed).squeeze(1))
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        empty = counts.squeeze(1) == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp(min=1))
        if empty.any():  # re-seed empty clusters on the worst-fit points so every code is used
            worst = torch.cdist(x, centroids).min(dim=1).values.argsort(descending=True)
            centroids[empty] = x[worst[: int(empty.sum())]]
    return centroids


def balanced_assign(dist: torch.Tensor, capacity: torch.Tensor | int, groups: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """dist: [m, k]. Each item gets a code, no code holding more than `capacity` items of the item's group, nearer
    pairs first. groups [m] (default: one group) and capacity per group [n_groups] (or one int for all).

    Rounds of proposals, every group at once: every unassigned item proposes its nearest code with room left in its
    group; each (group, code) keeps its closest proposers up to its remaining room.
    """
    m, k = dist.shape
    groups = torch.zeros(m, dtype=torch.long) if groups is None else groups
    n_groups = int(groups.max()) + 1 if m else 0
    cap = torch.as_tensor(capacity, dtype=torch.long).expand(n_groups) if isinstance(capacity, int) else capacity
    room = cap.unsqueeze(1).repeat(1, k)  # [n_groups, k]
    assign = torch.full((m,), -1, dtype=torch.long)
    while (assign < 0).any():
        todo = torch.nonzero(assign < 0).squeeze(1)
        g = groups[todo]
        d = dist[todo].masked_fill(room[g] == 0, float("inf"))
        choice = d.argmin(dim=1)
        key = g * k + choice
        near = d[torch.arange(len(todo)), choice]
        order = torch.argsort(near, stable=True)
        order = order[torch.argsort(key[order], stable=True)]  # by (group, code), nearest first within
        take = _closest_per_key(order, key, room.view(-1))
        assign[todo[take]] = choice[take]
        room.view(-1).sub_(torch.bincount(key[take], minlength=n_groups * k))
        if len(take) < STALLED * len(todo):  # a blob filling one code per round: finish code by code
            _fill_code_by_code(dist, assign, room, groups)
    return assign


def _closest_per_key(order: torch.Tensor, key: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Of the items in `order` (sorted by key, closest first within a key), those within their key's room."""
    sorted_key = key[order]
    rank = torch.arange(len(order)) - torch.searchsorted(sorted_key, sorted_key, right=False)
    return order[rank < room[sorted_key]]


def _fill_code_by_code(dist: torch.Tensor, assign: torch.Tensor, room: torch.Tensor, groups: torch.Tensor) -> None:
    """What stalled rounds leave: a dense blob of near-identical items fills one code per round (a million-item
    catalog took ~100 rounds a level), so each code in turn takes its closest unassigned items of each group."""
    todo = torch.nonzero(assign < 0).squeeze(1)
    scale = float(dist[todo].max()) * 1.001 + 1e-12 if len(todo) else 1.0
    for code in range(dist.shape[1]):
        if not len(todo):
            return
        if not bool((room[:, code] > 0).any()):
            continue
        g = groups[todo]
        order = torch.argsort(g.double() + dist[todo, code].double() / scale)  # by group, closest first within
        take = _closest_per_key(order, g, room[:, code])
        assign[todo[take]] = code
        room[:, code].sub_(torch.bincount(g[take], minlength=room.shape[0]))
        todo = todo[assign[todo] < 0]


def residual_kmeans(x: np.ndarray, n_levels: int, k: int, seed: int = 0) -> np.ndarray:
    """Codes [n, n_levels]: level l clusters what levels < l left unexplained."""
    gen = torch.Generator().manual_seed(seed)
    residual = torch.as_tensor(x, dtype=torch.float32).clone()
    codes = np.zeros((x.shape[0], n_levels), dtype=np.int64)
    for level in range(n_levels):
        centroids = kmeans(residual, k, gen)
        dist = torch.cdist(residual, centroids)
        groups = np.unique(codes[:, :level], axis=0, return_inverse=True)[1].reshape(-1) if level else \
            np.zeros(len(x), dtype=np.int64)
        group_t = torch.as_tensor(groups, dtype=torch.long)
        sizes = torch.bincount(group_t)
        assign = balanced_assign(dist, (sizes + len(centroids) - 1) // len(centroids), group_t)
        codes[:, level] = assign.numpy()
        residual = residual - centroids[assign]
    return codes
