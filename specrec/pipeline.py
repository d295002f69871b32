"""From a dataset name to trained artifacts: data, split, semantic IDs, target (built once, then cached)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specrec.data.dataset import InteractionData, Split, sparse_interactions, split_holdout
from specrec.data.movielens import load_dataset
from specrec.models.profiles import TargetProfile, target_profile
from specrec.paths import artifact_dir
from specrec.semantic_ids.categories import categories_path, save_categories
from specrec.semantic_ids.codebook import SemanticIds, build_semantic_ids, item_vectors
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.trie import ItemTrie
from specrec.training.examples import encode_prompt
from specrec.training.target import TARGET_DIR, train_target

log = logging.getLogger(__name__)
N_HOLDOUT = 10


@dataclass
class Artifacts:
    directory: Path
    data: InteractionData
    split: Split
    sids: SemanticIds
    trie: ItemTrie
    profile: TargetProfile

    @property
    def target_dir(self) -> Path:
        return self.directory / TARGET_DIR

    def constraint(self, n_items: int | None = None, exclude_history: bool = True) -> ListConstraint:
        return ListConstraint(self.trie, n_items or self.profile.list_len, exclude_history)

    def prompt(self, user: int) -> list[int]:
        """The target's prompt for a user: the last max_history items of their training history."""
        return encode_prompt(self.sids, self.split.train[user][-self.profile.max_history:])


def dataset_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def popularity(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in sequences:
        np.add.at(counts, seq, 1)
    return counts


def build_ids(data: InteractionData, split: Split, seed: int) -> SemanticIds:
    # Only training interactions feed the collaborative vectors: held-out items must not leak in.
    vectors = item_vectors(data.genres, data.years, sparse_interactions(split.train, data.n_items))
    return build_semantic_ids(vectors, popularity(split.train, data.n_items), data.item_ids, data.titles, seed=seed)


def prepare(dataset: str = "ml-100k", profile: str = "small", seed: int = 0, train: bool = True,
            progress: bool = True, directory: Path | None = None) -> Artifacts:
    """Load data and build or load the semantic IDs and the target for this dataset and profile."""
    prof = target_profile(profile)
    data = load_dataset(dataset)
    split = split_holdout(data, n_holdout=N_HOLDOUT)
    directory = directory or artifact_dir(dataset_slug(data.name), prof.name)
    try:
        sids = SemanticIds.load(directory)
    except FileNotFoundError:
        log.info("building semantic IDs for %d items", data.n_items)
        sids = build_ids(data, split, seed)
        sids.save(directory)
    if not categories_path(directory).is_file():  # artifacts from before category filters get them too
        save_categories(directory, data)
    arts = Artifacts(directory, data, split, sids, ItemTrie(sids), prof)
    if train and not (arts.target_dir / "config.json").is_file():
        log.info("training the %s target (%s) into %s", prof.name, data.name, arts.target_dir)
        train_target(sids, split.train, prof, directory, seed=seed, progress=progress)
        from specrec.quality_guard import check_quality  # evaluation imports this module

        check_quality(arts, seed=seed)
    return arts
