"""Quality guard: after training, is the target better than recommending the most popular items? Said loudly
when it is not, with why (figures that tell the causes apart) and what to try; the verdict is kept beside the
weights (target/quality.json)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np

from specrec.artifacts import Artifacts
from specrec.evaluation import beam_lists, eval_users, popularity_lists, recall_ndcg, target_lists, transition_lists
from specrec.models.llama import Transformer
from specrec.models.profiles import TARGET_PROFILES
from specrec.training.examples import window_index
from specrec.verify import TargetVerifier

log = logging.getLogger(__name__)
GUARD_USERS = 300  # held-out users sampled: enough to tell a model from popularity, seconds on a CPU
REPORT = "quality.json"


WEAK_SIGNAL = 1.2  # a sequence baseline less than this much better than popularity: little to learn beyond it


@dataclass(frozen=True)
class QualityVerdict:
    target_ndcg: float  # the list Recommend generates (greedy)
    popularity_ndcg: float
    users: int
    k: int
    epochs: float  # training lists seen / training windows of the data
    beam_ndcg: float = float("nan")  # top-k by beam search of width k (Retrieve) from the same model
    transition_ndcg: float = float("nan")  # the items that came next after the user's last item, then popularity

    @property
    def beats_popularity(self) -> bool:
        return self.target_ndcg > self.popularity_ndcg

    def message(self, profile: str) -> str:
        figures = (f"NDCG@{self.k} {self.target_ndcg:.4f} vs popularity's {self.popularity_ndcg:.4f} on "
                   f"{self.users} held-out users")
        if self.beats_popularity:
            return f"the {profile} target beats popularity: {figures}"
        return (f"THE TRAINED TARGET IS NOT BETTER THAN POPULARITY: {figures}. Lists from this target are worse "
                "than the most popular items. Why: " + " ".join(self.reasons(profile)))

    def reasons(self, profile: str) -> list[str]:
        """What the figures say about the causes, each with what to try."""
        names = list(TARGET_PROFILES)
        larger = names[names.index(profile) + 1:] if profile in names else []
        bigger = f"a larger profile ({' or '.join(f'--profile {n}' for n in larger)})" if larger else \
            "a larger model (no larger profile ships: a profile of your own)"
        out = []
        if self.beam_ndcg > self.popularity_ndcg:
            out.append(f"Top-{self.k} by beam search from the same model does beat popularity (NDCG "
                       f"{self.beam_ndcg:.4f}): greedy list generation commits to one code at a time and misses the "
                       "items the model ranks best; ask the Retrieve RPC for top-K lists.")
        if self.transition_ndcg < WEAK_SIGNAL * self.popularity_ndcg:
            out.append(f"The data holds little to learn beyond popularity: the items that most often came next after "
                       f"a user's last item score {self.transition_ndcg:.4f}, under {WEAK_SIGNAL}x popularity; on such "
                       "data popularity is hard to beat.")
        if self.epochs < 1:
            out.append(f"Training saw {self.epochs:.2g} epochs of the data's training windows: train {bigger}, or "
                       "longer.")
        else:
            out.append(f"Training saw {self.epochs:.2g} epochs, so more of the same steps is unlikely to help: try "
                       f"{bigger}, and check the data (items with very few interactions get semantic IDs the model "
                       "cannot learn).")
        return out


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
    transition = recall_ndcg(transition_lists(arts, picked, k), truths, k)
    beam = recall_ndcg(beam_lists(arts, TargetVerifier(arts.directory, max_sequences=1, model=model), picked, k),
                       truths, k)
    windows = len(window_index(arts.split.train, arts.profile.list_len))
    epochs = arts.profile.steps * arts.profile.batch_size / max(1, windows)
    verdict = QualityVerdict(target.ndcg, popular.ndcg, target.users, k, epochs, beam.ndcg, transition.ndcg)
    if save:
        (arts.target_dir / REPORT).write_text(json.dumps(asdict(verdict) | {"beats_popularity":
                                                                            verdict.beats_popularity}, indent=1))
    if verdict.beats_popularity:
        log.info(verdict.message(arts.profile.name))
    else:
        log.warning(verdict.message(arts.profile.name))
    return verdict
