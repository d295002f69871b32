"""From a dataset name to trained artifacts: data, split, semantic IDs, target (built once, then cached)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from specrec.artifacts import Artifacts
from specrec.data.dataset import InteractionData, Split, popularity, sparse_interactions, split_holdout
from specrec.data.movielens import load_dataset
from specrec.models.profiles import target_profile
from specrec.paths import artifact_dir
from specrec.quality_guard import check_quality
from specrec.semantic_ids.categories import categories_path, save_categories
from specrec.semantic_ids.codebook import SemanticIds, build_semantic_ids, item_vectors
from specrec.semantic_ids.trie import ItemTrie
from specrec.training.target import train_target

log = logging.getLogger(__name__)
N_HOLDOUT = 10


def dataset_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


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
        check_quality(arts, seed=seed)
    return arts
