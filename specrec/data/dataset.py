"""In-memory interaction data (item catalog + per-user chronological sequences) and the holdout split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and what was expected."""


# eq=False: the fields hold numpy arrays, for which a generated __eq__ would raise instead of comparing.
@dataclass(eq=False)
class InteractionData:
    """An item catalog and, per user, the items they interacted with in chronological order.

    Items are addressed by an internal index 0..n_items-1 everywhere (sequences, genres, years);
    ``item_ids`` maps it back to the catalog's own id. Items nobody interacted with stay in the catalog.
    """

    name: str
    item_ids: list[str]
    titles: list[str]
    years: np.ndarray  # float32 [n_items], NaN if unknown
    genres: np.ndarray  # float32 [n_items, n_genres], multi-hot
    genre_names: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]  # per user, int64 internal item indices, oldest first
    _item_index: dict[str, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Catch inconsistent loaders/generators here rather than as an IndexError deep inside training.
        n = len(self.item_ids)
        if len(self.titles) != n or self.years.shape != (n,) or self.genres.shape[:1] != (n,):
            raise DataError(
                f"{self.name}: per-item fields disagree on the number of items: item_ids {n}, "
                f"titles {len(self.titles)}, years {self.years.shape}, genres {self.genres.shape}"
            )
        if self.genres.ndim != 2 or self.genres.shape[1] != len(self.genre_names):
            raise DataError(
                f"{self.name}: genres has shape {self.genres.shape} but there are {len(self.genre_names)} genre names"
            )
        if len(self.user_ids) != len(self.sequences):
            raise DataError(f"{self.name}: {len(self.user_ids)} user ids but {len(self.sequences)} sequences")
        if self.sequences:
            flat = np.concatenate(self.sequences)
            if flat.size and (flat.min() < 0 or flat.max() >= n):
                raise DataError(f"{self.name}: sequences hold item indices outside 0..{n - 1}")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal index (built once, then cached)."""
        if self._item_index is None:
            self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        return self._item_index


@dataclass(eq=False)
class Split:
    """Per-user train prefix and held-out test suffix, aligned with ``InteractionData.user_ids``."""

    train: list[np.ndarray]
    test: list[np.ndarray]


def split_holdout(data: InteractionData, n_holdout: int = 10, min_train: int = 5) -> Split:
    """Hold out each user's chronologically last ``n_holdout`` items as their test set.

    Users with fewer than ``n_holdout + min_train`` items are too short to evaluate: all their items go
    to train and their test array is empty. If a user consumed a test item earlier too (repeat
    interactions; never the case for MovieLens or the synthetic generator), those earlier occurrences
    are dropped from train so that a test item is never visible in that user's history.
    """
    if n_holdout < 1 or min_train < 0:
        raise ValueError(f"need n_holdout >= 1 and min_train >= 0, got {n_holdout} and {min_train}")
    empty = np.zeros(0, dtype=np.int64)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for seq in data.sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < n_holdout + min_train:
            train.append(seq.copy())
            test.append(empty.copy())
            continue
        head, tail = seq[:-n_holdout], seq[-n_holdout:]
        train.append(head[~np.isin(head, tail)])
        test.append(tail.copy())
    return Split(train=train, test=test)


def popularity(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """Interactions per item."""
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in sequences:
        np.add.at(counts, seq, 1)
    return counts


def sparse_interactions(sequences: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """The 0/1 user x item matrix, sparse (float32): memory grows with the interactions, not users x items."""
    lengths = [len(s) for s in sequences]
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sum(lengths) else \
        np.zeros(0, dtype=np.int64)
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"sequences hold item indices outside 0..{n_items - 1}")
    rows = np.repeat(np.arange(len(sequences)), lengths)
    matrix = sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(sequences), n_items))
    matrix.data[:] = 1.0  # a repeated item counts once
    return matrix


def interaction_matrix(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """Dense 0/1 user x item matrix (float32 [len(sequences), n_items]).

    Dense is fine for ML-100k (943 x 1682); for large catalogs pass a subset of users (and a remapped
    subset of items), since the matrix costs 4 * users * items bytes. Above 2 GiB this refuses.
    """
    n_users = len(sequences)
    nbytes = 4 * n_users * n_items
    if nbytes > 2 << 30:
        raise ValueError(
            f"a dense {n_users} x {n_items} matrix needs {nbytes / 2**30:.1f} GiB; pass a subset of users/items"
        )
    matrix = np.zeros((n_users, n_items), dtype=np.float32)
    lengths = [len(s) for s in sequences]
    if sum(lengths) == 0:
        return matrix
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    if cols.min() < 0 or cols.max() >= n_items:
        raise ValueError(f"sequences hold item indices outside 0..{n_items - 1}")
    rows = np.repeat(np.arange(n_users), lengths)
    matrix[rows, cols] = 1.0
    return matrix
