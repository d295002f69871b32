"""Interaction data for specrec: MovieLens (recbole wheel or GroupLens files), synthetic data, splits."""

from specrec.data.dataset import DataError, InteractionData, Split, interaction_matrix, split_holdout
from specrec.data.movielens import load_dataset, load_grouplens, load_movielens_100k
from specrec.data.synthetic import synthetic

__all__ = [
    "DataError",
    "InteractionData",
    "Split",
    "interaction_matrix",
    "load_dataset",
    "load_grouplens",
    "load_movielens_100k",
    "split_holdout",
    "synthetic",
]
