"""Residual k-means (RQ-KMeans): k-means on item vectors, then on each level's residuals.

Assignment is balanced inside each group of items that share the earlier codes (each code takes at
most ceil(group / k) of them), so near-identical items -- e.g. rarely rated ones -- still spread out
and few items need the collision level.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. x: [n, d]. Returns centroids [k, d]."""
    n = x.shape[0]
    k = min(k, n)
    centroids = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next seed drawn proportional to squared distance
        d2 = torch.cdist(x, centroids).min(dim=1).values.pow(2)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
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


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """dist: [m, k]. Each item gets a code, no code more than `capacity` items, nearer pairs first.

    Rounds of proposals: every unassigned item proposes its nearest code with room left; each code
    keeps its closest proposers up to its remaining room.
    """
    m, k = dist.shape
    assign = torch.full((m,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while (assign < 0).any():
        todo = torch.nonzero(assign < 0).squeeze(1)
        d = dist[todo].masked_fill((room == 0).unsqueeze(0), float("inf"))
        choice = d.argmin(dim=1)
        order = torch.argsort(d[torch.arange(len(todo)), choice])
        for code in torch.unique(choice).tolist():
            picked = order[choice[order] == code][: int(room[code])]
            assign[todo[picked]] = code
            room[code] -= len(picked)
    return assign


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
        assign = torch.zeros(len(x), dtype=torch.long)
        for g in np.unique(groups):
            members = torch.as_tensor(np.flatnonzero(groups == g))
            assign[members] = balanced_assign(dist[members], math.ceil(len(members) / len(centroids)))
        codes[:, level] = assign.numpy()
        residual = residual - centroids[assign]
    return codes
