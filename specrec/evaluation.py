"""Offline quality: Recall@K and NDCG@K of generated lists against each user's held-out items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specrec.decoding.plain import decode
from specrec.models.llama import Transformer
from specrec.pipeline import Artifacts, popularity


@dataclass
class Quality:
    recall: float
    ndcg: float
    users: int


def recall_ndcg(recs: list[list[int]], truths: list[np.ndarray], k: int = 10) -> Quality:
    recalls, ndcgs = [], []
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for rec, truth in zip(recs, truths, strict=True):
        if len(truth) == 0:
            continue
        relevant = set(int(t) for t in truth)
        hits = np.array([int(i) in relevant for i in rec[:k]], dtype=np.float64)
        hits = np.pad(hits, (0, k - len(hits)))
        recalls.append(hits.sum() / min(len(relevant), k))
        ndcgs.append((hits * discounts).sum() / discounts[: min(len(relevant), k)].sum())
    return Quality(float(np.mean(recalls)), float(np.mean(ndcgs)), len(recalls))


def popularity_lists(arts: Artifacts, users: list[int], k: int) -> list[list[int]]:
    """Most popular training items, skipping what the user has seen (the same rule the model obeys)."""
    ranked = np.argsort(-popularity(arts.split.train, arts.data.n_items), kind="stable")
    out = []
    for u in users:
        seen = set(int(i) for i in arts.split.train[u][-arts.profile.max_history:])
        out.append([int(i) for i in ranked if int(i) not in seen][:k])
    return out


def eval_users(arts: Artifacts, limit: int | None = None) -> list[int]:
    users = [u for u in range(arts.data.n_users) if len(arts.split.test[u]) and len(arts.split.train[u])]
    return users[:limit] if limit else users


@torch.inference_mode()
def target_lists(arts: Artifacts, model: Transformer, users: list[int], k: int, batch: int = 64) -> list[list[int]]:
    constraint = arts.constraint(n_items=k)
    out: list[list[int]] = []
    for i in range(0, len(users), batch):
        prompts = [arts.prompt(u) for u in users[i:i + batch]]
        out += [d.items for d in decode(model, constraint, prompts)]
    return out


def evaluate(arts: Artifacts, model: Transformer, k: int = 10, limit: int | None = None) -> dict[str, Quality]:
    users = eval_users(arts, limit)
    truths = [arts.split.test[u] for u in users]
    return {"target": recall_ndcg(target_lists(arts, model, users, k), truths, k),
            "popularity": recall_ndcg(popularity_lists(arts, users, k), truths, k)}
