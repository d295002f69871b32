"""Quality guard: after training, is the target better than recommending the most popular items? Said loudly
when it is not, with what to try; the verdict is kept beside the weights (target/quality.json)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

from specrec.evaluation import eval_users, popularity_lists, recall_ndcg, target_lists
from specrec.models.llama import Transformer
from specrec.pipeline import Artifacts
from specrec.training.examples import window_index

log = logging.getLogger(__name__)
GUARD_USERS = 300  # held-out users sampled: enough to tell a model from popularity, seconds on a CPU
REPORT = "quality.json"


@dataclass(frozen=True)
class QualityVerdict:
    target_ndcg: float
    popularity_ndcg: float
    users: int
    k: int
    epochs: float  # training lists seen / training windows of the data

    @property
    def beats_popularity(self) -> bool:
        return self.target_ndcg > self.popularity_ndcg

    def message(self, profile: str) -> str:
        figures = (f"NDCG@{self.k} {self.target_ndcg:.4f} vs popularity's {self.popularity_ndcg:.4f} on "
                   f"{self.users} held-out users")
        if self.beats_popularity:
            return f"the {profile} target beats popularity: {figures}"
        return (f"THE TRAINED TARGET IS NOT BETTER THAN POPULARITY: {figures}. Its training saw {self.epochs:.2g} "
                "epochs of the data's training windows: train a larger profile (--profile small or bench, more "
                "steps), and check the data: items with very few interactions get semantic IDs the model cannot "
                "learn. Lists from this target are worse than the most popular items.")


def check_quality(arts: Artifacts, users: int = GUARD_USERS, k: int = 10, seed: int = 0,
                  model: Transformer | None = None) -> QualityVerdict:
    """Evaluate the artifacts' target against popularity on sampled held-out users; log the verdict and save it
    beside the weights. `model`: check this model instead (nothing saved)."""
    save = model is None
    model = model or Transformer.from_pretrained(arts.target_dir)
    pool = eval_users(arts)
    if not pool:
        raise ValueError(f"{arts.data.name} has no user with held-out items: nothing to check the target on")
    picked = sorted(np.random.default_rng(seed).choice(pool, size=min(users, len(pool)), replace=False).tolist())
    truths = [arts.split.test[u] for u in picked]
    target = recall_ndcg(target_lists(arts, model, picked, k), truths, k)
    popular = recall_ndcg(popularity_lists(arts, picked, k), truths, k)
    windows = len(window_index(arts.split.train, arts.profile.list_len))
    epochs = arts.profile.steps * arts.profile.batch_size / max(1, windows)
    verdict = QualityVerdict(target.ndcg, popular.ndcg, target.users, k, epochs)
    if save:
        (arts.target_dir / REPORT).write_text(json.dumps(asdict(verdict) | {"beats_popularity":
                                                                            verdict.beats_popularity}, indent=1))
    if verdict.beats_popularity:
        log.info(verdict.message(arts.profile.name))
    else:
        log.warning(verdict.message(arts.profile.name))
    return verdict
