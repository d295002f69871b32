"""Seeded synthetic interaction data of any size: Zipf popularity, user clusters, Markov item transitions."""

from __future__ import annotations

import numpy as np

from specrec.data.dataset import InteractionData

_N_SUCCESSORS = 4
# A few strong successors per item, like sequels or "people who watched X next watched Y".
_SUCCESSOR_WEIGHTS = np.array([0.5, 0.25, 0.15, 0.10])
_P_MARKOV = 0.6  # chance that the next item is one of the previous item's successors
_P_HOME = 0.75  # chance that a cluster draw comes from the cluster's own items rather than global popularity
_LENGTH_SIGMA = 0.7  # log-normal spread of sequence lengths (long tail of heavy users, as in MovieLens)
_MIN_LENGTH = 5


def synthetic(
    n_users: int = 1000,
    n_items: int = 2000,
    seed: int = 0,
    n_clusters: int = 8,
    mean_length: int = 40,
    zipf_a: float = 1.1,
    n_genres: int = 12,
) -> InteractionData:
    """Generate users' chronological item sequences; the same arguments always give the same data.

    Items have Zipf(``zipf_a``) popularity and a home cluster; a user belongs to one cluster and draws
    mostly from its items, weighted by popularity. With probability 0.6 the next item is instead one of
    the previous item's 4 fixed successors, which gives the sequences learnable Markov structure. A user
    never repeats an item. Genres and release years follow the item's home cluster, so item features
    carry signal too. Setup is vectorised over items; only the sequence walk loops (once per interaction).
    """
    if min(n_users, n_items, n_clusters, mean_length) < 1 or n_genres < 0 or zipf_a <= 0:
        raise ValueError("synthetic() needs n_users, n_items, n_clusters, mean_length >= 1, n_genres >= 0, zipf_a > 0")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** zipf_a
    home = rng.integers(n_clusters, size=n_items)
    sampler = _ClusterSampler(popularity, home, n_clusters)
    successors = _successors(sampler, home, rng)

    user_cluster = rng.integers(n_clusters, size=n_users)
    lengths = _lengths(n_users, n_items, mean_length, rng)
    sequences = _walk(sampler, successors, user_cluster, lengths, rng)

    years = _years(home, n_clusters, rng)
    genres = _genres(home, n_clusters, n_genres, rng)
    return InteractionData(
        name=_name(n_users, n_items, seed, n_clusters, mean_length, zipf_a, n_genres),
        item_ids=list(map(str, range(n_items))),
        titles=[""] * n_items,
        years=years,
        genres=genres,
        genre_names=[f"genre{g:02d}" for g in range(n_genres)],
        user_ids=list(map(str, range(n_users))),
        sequences=sequences,
    )


class _ClusterSampler:
    """Draws items for many clusters at once: home items by popularity with prob. _P_HOME, else any item."""

    def __init__(self, popularity: np.ndarray, home: np.ndarray, n_clusters: int) -> None:
        self.global_cdf = np.cumsum(popularity) / popularity.sum()
        # Items grouped by home cluster; cluster c's normalised CDF is shifted into [c, c+1], so one
        # searchsorted over the concatenation serves draws for any mix of clusters.
        self.order = np.argsort(home, kind="stable")
        counts = np.bincount(home, minlength=n_clusters)
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.count = counts
        sorted_pop = popularity[self.order]
        cum = np.cumsum(sorted_pop)
        nonempty = counts > 0
        starts, sizes = self.start[nonempty], counts[nonempty]
        mass_before = np.repeat(cum[starts] - sorted_pop[starts], sizes)  # popularity of earlier clusters
        mass_own = np.repeat(np.add.reduceat(sorted_pop, starts), sizes)
        self.shifted_cdf = np.repeat(np.arange(n_clusters), counts) + (cum - mass_before) / mass_own

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``clusters``."""
        u = rng.random(len(clusters))
        from_home = (rng.random(len(clusters)) < _P_HOME) & (self.count[clusters] > 0)
        items = _searchsorted_fast(self.global_cdf, u)
        c = clusters[from_home]
        pos = _searchsorted_fast(self.shifted_cdf, c + u[from_home])
        # Rounding can push a draw just past its cluster's last item; clamp it back inside the segment.
        pos = np.clip(pos, self.start[c], self.start[c] + self.count[c] - 1)
        items[from_home] = self.order[pos]
        return np.minimum(items, len(self.global_cdf) - 1)


def _searchsorted_fast(cdf: np.ndarray, queries: np.ndarray) -> np.ndarray:
    # numpy's binary search reuses the previous bound for sorted queries: sorting first is ~5x faster
    # on big catalogs, where random lookups into a 1M-entry CDF are all cache misses.
    order = np.argsort(queries)
    result = np.empty(len(queries), dtype=np.int64)
    result[order] = np.searchsorted(cdf, queries[order], side="right")
    return result


def _successors(sampler: _ClusterSampler, home: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n_items, k] likely next items, drawn from each item's home-cluster distribution (never itself)."""
    n_items = len(home)
    k = min(_N_SUCCESSORS, n_items - 1)
    succ = sampler.sample(np.repeat(home, k), rng).reshape(n_items, k)
    own = succ == np.arange(n_items)[:, None]
    # Replace self-loops by a uniformly random other item.
    succ[own] = (np.nonzero(own)[0] + 1 + rng.integers(max(n_items - 1, 1), size=own.sum())) % n_items
    return succ


def _lengths(n_users: int, n_items: int, mean_length: int, rng: np.random.Generator) -> np.ndarray:
    mu = np.log(mean_length) - _LENGTH_SIGMA**2 / 2  # so that the log-normal's mean is mean_length
    raw = np.rint(rng.lognormal(mu, _LENGTH_SIGMA, size=n_users)).astype(np.int64)
    return np.clip(raw, min(_MIN_LENGTH, mean_length, n_items), min(n_items, 20 * mean_length))


def _walk(
    sampler: _ClusterSampler,
    successors: np.ndarray,
    user_cluster: np.ndarray,
    lengths: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Each user's sequence: follow a successor of the previous item or draw from the user's cluster."""
    # All randomness is drawn up front, vectorised; the loop below only does cheap list/set operations.
    pool_sizes = 2 * lengths + 8  # spare draws for when a drawn item was already seen
    # memoryviews index like lists but need no conversion of millions of numpy ints up front.
    pools = memoryview(sampler.sample(np.repeat(user_cluster, pool_sizes), rng))
    pool_ends = np.cumsum(pool_sizes).tolist()
    k = successors.shape[1]
    n_steps = int(lengths.sum())
    follow = (rng.random(n_steps) < _P_MARKOV).tolist() if k else [False] * n_steps
    weights = _SUCCESSOR_WEIGHTS[:k] / _SUCCESSOR_WEIGHTS[:k].sum() if k else np.ones(1)
    # min(): float rounding can leave the last cumulative weight a hair below a draw close to 1.
    pick = np.minimum(np.searchsorted(np.cumsum(weights), rng.random(n_steps), side="right"), max(k - 1, 0)).tolist()
    succ = memoryview(np.ascontiguousarray(successors).ravel())

    sequences = []
    step, pool_pos = 0, 0
    for length, pool_end in zip(lengths.tolist(), pool_ends, strict=True):
        end_step = step + length
        seq: list[int] = []
        seen: set[int] = set()
        for _ in range(length):
            item = -1
            if seq and follow[step]:
                row = seq[-1] * k
                for j in range(k):  # the chosen successor, else the next unseen one
                    cand = succ[row + (pick[step] + j) % k]
                    if cand not in seen:
                        item = cand
                        break
            while item < 0 and pool_pos < pool_end:
                cand = pools[pool_pos]
                pool_pos += 1
                if cand not in seen:
                    item = cand
            step += 1
            if item < 0:
                break  # spare draws exhausted (tiny catalogs): this user's history just ends earlier
            seq.append(item)
            seen.add(item)
        sequences.append(np.array(seq, dtype=np.int64))
        step, pool_pos = end_step, pool_end
    return sequences


def _years(home: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    era = rng.uniform(1950, 2015, size=n_clusters)
    years = np.rint(era[home] + rng.normal(0, 8, size=len(home)))
    return np.clip(years, 1920, 2024).astype(np.float32)


def _genres(home: np.ndarray, n_clusters: int, n_genres: int, rng: np.random.Generator) -> np.ndarray:
    """1-3 genres per item, drawn without replacement from its home cluster's genre profile."""
    n_items = len(home)
    genres = np.zeros((n_items, n_genres), dtype=np.float32)
    if n_genres == 0:
        return genres
    profile = rng.dirichlet(np.full(n_genres, 0.3), size=n_clusters)
    # Gumbel-top-k: adding Gumbel noise to log-probabilities and taking the top k samples without replacement.
    scores = np.log(profile[home] + 1e-12) + rng.gumbel(size=(n_items, n_genres))
    n_per_item = rng.integers(1, min(3, n_genres) + 1, size=n_items)
    rows = np.arange(n_items)
    for j in range(min(3, n_genres)):  # three argmax passes beat a full argsort of every row
        best = scores.argmax(axis=1)
        take = n_per_item > j
        genres[rows[take], best[take]] = 1.0
        scores[rows, best] = -np.inf
    return genres


def _name(
    n_users: int, n_items: int, seed: int, n_clusters: int, mean_length: int, zipf_a: float, n_genres: int
) -> str:
    # Non-default knobs go into the name too, so artifacts trained on different data never share a path.
    name = f"synthetic-u{n_users}-i{n_items}-s{seed}"
    for tag, value, default in (
        ("c", n_clusters, 8), ("l", mean_length, 40), ("z", zipf_a, 1.1), ("g", n_genres, 12),
    ):  # fmt: skip
        if value != default:
            name += f"-{tag}{value:g}"
    return name
