"""Residual k-means (RQ-KMeans): k-means on item vectors, then on each level's residuals."""

from __future__ import annotations

import numpy as np
import torch


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. x: [n, d]. Returns (centroids [k, d], assignment [n])."""
    n = x.shape[0]
    k = min(k, n)
    centroids = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next seed drawn proportional to squared distance
        d2 = torch.cdist(x, centroids).min(dim=1).values.pow(2)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=generator)]])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        empty = counts.squeeze(1) == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp(min=1))
        if empty.any():  # re-seed empty clusters on the worst-fit points so every code is used
            worst = torch.cdist(x, centroids).min(dim=1).values.argsort(descending=True)
            centroids[empty] = x[worst[: int(empty.sum())]]
    return centroids, assign


def residual_kmeans(x: np.ndarray, n_levels: int, k: int, seed: int = 0) -> np.ndarray:
    """Codes [n, n_levels]: level l clusters what levels < l left unexplained."""
    gen = torch.Generator().manual_seed(seed)
    residual = torch.as_tensor(x, dtype=torch.float32).clone()
    codes = np.zeros((x.shape[0], n_levels), dtype=np.int64)
    for level in range(n_levels):
        centroids, assign = kmeans(residual, k, gen)
        codes[:, level] = assign.numpy()
        residual = residual - centroids[assign]
    return codes
