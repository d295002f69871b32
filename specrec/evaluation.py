"""Offline quality: Recall@K and NDCG@K of generated lists against each user's held-out items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specrec.artifacts import Artifacts
from specrec.data.dataset import popularity
from specrec.decoding.plain import decode
from specrec.models.llama import Transformer
from specrec.semantic_ids.constraint import ListConstraint
from specrec.speculation.local import retrieve
from specrec.verify import TargetVerifier


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
    # the k + max_history most popular hold every list: at most max_history of them are seen (1M items: no
    # per-user pass over the whole catalog)
    ranked = np.argsort(-popularity(arts.split.train, arts.data.n_items), kind="stable")[:k + arts.profile.max_history]
    out = []
    for u in users:
        seen = set(int(i) for i in arts.split.train[u][-arts.profile.max_history:])
        out.append([int(i) for i in ranked if int(i) not in seen][:k])
    return out


def transition_lists(arts: Artifacts, users: list[int], k: int) -> list[list[int]]:
    """A plain sequence baseline: the items that most often came right after the user's last item in the training
    sequences, then popularity; skipping what the user has seen. How much sequential signal the data holds beyond
    popularity, at one pass over the interactions."""
    last = {int(arts.split.train[u][-1]) for u in users}
    steps = [np.stack([seq[:-1], seq[1:]], axis=1) for seq in arts.split.train if len(seq) > 1]
    pairs = np.concatenate(steps) if steps else np.zeros((0, 2), dtype=np.int64)
    pairs = pairs[np.isin(pairs[:, 0], list(last))]
    followers: dict[int, list[int]] = {}
    for item in last:
        nxt, counts = np.unique(pairs[pairs[:, 0] == item, 1], return_counts=True)
        followers[item] = [int(i) for i in nxt[np.argsort(-counts, kind="stable")]]
    out = []
    for u, fallback in zip(users, popularity_lists(arts, users, k), strict=True):
        seen = set(int(i) for i in arts.split.train[u][-arts.profile.max_history:])
        ranked = [i for i in followers[int(arts.split.train[u][-1])] if i not in seen]
        out.append((ranked + [i for i in fallback if i not in ranked])[:k])
    return out


def beam_lists(arts: Artifacts, verifier: TargetVerifier, users: list[int], k: int) -> list[list[int]]:
    """Top-k items by beam search of width k (what the Retrieve RPC answers), plain, in this process."""
    constraint = ListConstraint(verifier.trie, k)
    return [[r.item for r in retrieve(arts.prompt(u), constraint, k, verifier).results] for u in users]


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
