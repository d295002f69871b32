"""Data package: real MovieLens-100k, GroupLens file formats, clear errors, synthetic data, holdout split."""

from __future__ import annotations

import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from specrec.data import (
    DataError,
    InteractionData,
    interaction_matrix,
    load_dataset,
    load_grouplens,
    load_movielens_100k,
    movielens,
    split_holdout,
    synthetic,
)


@pytest.fixture(scope="session")
def ml100k() -> InteractionData:
    # Default cache (data_dir(), which honours SPECREC_HOME): the wheel is downloaded once per machine.
    return load_movielens_100k()


def _item(data: InteractionData, item_id: str) -> tuple[str, float, list[str]]:
    i = data.item_index()[item_id]
    genres = [g for g, flag in zip(data.genre_names, data.genres[i], strict=True) if flag]
    return data.titles[i], float(data.years[i]), genres


# ------------------------------------------------------------------------------------------- ML-100k


def test_ml100k_has_the_published_size(ml100k: InteractionData) -> None:
    assert ml100k.name == "ml-100k"
    assert (ml100k.n_users, ml100k.n_items, ml100k.n_interactions) == (943, 1682, 100_000)
    assert min(len(s) for s in ml100k.sequences) >= 20  # GroupLens kept only users with 20+ ratings
    assert all(s.dtype == np.int64 for s in ml100k.sequences)


def test_ml100k_sequences_are_chronological(ml100k: InteractionData) -> None:
    # Re-read the raw file independently and check each user's order against the timestamps.
    with zipfile.ZipFile(movielens.recbole_wheel()) as zf:
        lines = zf.read("recbole/dataset_example/ml-100k/ml-100k.inter").decode().splitlines()[1:]
    stamp = {}
    for line in lines:
        user, item, _, ts = line.split("\t")
        stamp[user, item] = float(ts)
    users, items = ml100k.user_ids, ml100k.item_ids
    for u, seq in enumerate(ml100k.sequences):
        times = [stamp[users[u], items[i]] for i in seq]
        assert times == sorted(times)
    assert set(stamp) == {(users[u], items[i]) for u, seq in enumerate(ml100k.sequences) for i in seq}


def test_ml100k_item_metadata(ml100k: InteractionData) -> None:
    assert _item(ml100k, "1") == ("Toy Story", 1995.0, ["Animation", "Children's", "Comedy"])
    assert len(ml100k.genre_names) == 18 and "unknown" not in ml100k.genre_names
    # The recbole file has a broken row for item 1412 (year "V"; the year sits in the title).
    assert _item(ml100k, "1412")[:2] == ("Land Before Time III: The Time of the Great Giving", 1995.0)
    # Item 267 is an "unknown" placeholder in the original data: no title, year or genre.
    title, year, genres = _item(ml100k, "267")
    assert title == "" and np.isnan(year) and genres == []
    assert np.isnan(ml100k.years).sum() == 1
    assert "Misérables, Les" in ml100k.titles  # UTF-8 decoded


def test_ml100k_is_read_from_a_cached_wheel_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recbole-1.2.1-py3-none-any.whl").write_bytes(movielens.recbole_wheel().read_bytes())
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert load_movielens_100k(cache_dir=tmp_path).n_interactions == 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recbole-1.2.1-py3-none-any.whl"]  # nothing extracted


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the wheel is cached")


def test_offline_download_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(DataError) as err:
        load_movielens_100k(cache_dir=tmp_path / "wheels")
    message = str(err.value)
    assert "recbole-1.2.1-py3-none-any.whl" in message and str(tmp_path / "wheels") in message
    assert "GroupLens" in message and "network unreachable" in message


def test_malformed_wheel_file_names_file_and_line(tmp_path: Path) -> None:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t100\n2\t11\n"
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tA\t1990\tDrama\n"
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.item", item)
    expected = r"ml-100k\.inter line 3: expected 4 tab-separated fields user_id, item_id, rating, timestamp, got 2"
    with pytest.raises(DataError, match=expected):
        load_movielens_100k(cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------- GroupLens

U_DATA = "1\t10\t5\t300\n1\t20\t3\t100\n2\t10\t4\t50\n1\t30\t4\t100\n3\t40\t2\t7\n"
U_ITEM_ROWS = [
    "10|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1" + "|0" * 13,
    "20|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1" + "|0" * 16,
    "30|Café Society (1995)|||http://x|0" + "|0" * 7 + "|1" + "|0" * 10,
    "99|Never Rated (1970)|01-Jan-1970||http://x|1" + "|0" * 18,
]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_grouplens_100k_format(tmp_path: Path) -> None:
    _write(tmp_path / "ml-100k" / "u.data", U_DATA)
    _write(tmp_path / "ml-100k" / "u.item", "\n".join(U_ITEM_ROWS) + "\n", encoding="latin-1")
    data = load_grouplens(tmp_path / "ml-100k" / "u.data")  # a file inside the directory works too

    assert data.name == "ml-100k"
    assert data.user_ids == ["1", "2", "3"]
    # Catalog order, then items rated but missing from u.item; never-rated item 99 stays in the catalog.
    assert data.item_ids == ["10", "20", "30", "99", "40"]
    # User 1: item 20 and 30 share timestamp 100 (file order kept), then 10 at 300.
    assert [data.item_ids[i] for i in data.sequences[0]] == ["20", "30", "10"]
    assert _item(data, "10") == ("Toy Story", 1995.0, ["Animation", "Children's", "Comedy"])
    assert _item(data, "30") == ("Café Society", 1995.0, ["Drama"])  # year from the title, latin-1 title
    assert _item(data, "99") == ("Never Rated", 1970.0, [])  # the "unknown" genre is no genre
    assert data.titles[data.item_index()["40"]] == "" and np.isnan(data.years[-1])


def test_grouplens_1m_format(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "5::2::4::978300760\n5::1::5::978300000\n6::3::1::978300001\n")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime|Thriller\n"
    _write(tmp_path / "movies.dat", movies + "3::Amélie (2001)::Comedy|Romance\n", encoding="latin-1")
    data = load_grouplens(tmp_path)

    assert (data.n_users, data.n_items, data.n_interactions) == (2, 3, 3)
    assert [data.item_ids[i] for i in data.sequences[0]] == ["1", "2"]
    assert _item(data, "3") == ("Amélie", 2001.0, ["Comedy", "Romance"])
    assert data.genre_names == sorted(data.genre_names) and len(data.genre_names) == 7


def test_load_dataset_dispatches_on_spec(tmp_path: Path) -> None:
    _write(tmp_path / "mine" / "ratings.dat", "1::1::5::1\n")
    assert load_dataset(str(tmp_path / "mine")).name == "mine"
    data = load_dataset("synthetic:users=30,items=500,seed=4")
    assert (data.n_users, data.n_items) == (30, 500) and data.name.startswith("synthetic-")
    with pytest.raises(DataError, match="users, items, seed"):
        load_dataset("synthetic:people=3")
    with pytest.raises(DataError, match="ml-100k"):
        load_dataset(str(tmp_path / "nowhere"))


# -------------------------------------------------------------------------------------------- errors


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file or directory; expected a GroupLens directory .*u\.data"):
        load_grouplens(tmp_path / "missing")
    with pytest.raises(DataError, match="found neither u.data nor ratings.dat"):
        load_grouplens(tmp_path)


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "u.data", "1\t10\t5\t300\n\n1\t20 3 100\n")
    with pytest.raises(DataError, match=r"u\.data line 3: expected 4 tab-separated fields user_id, item_id"):
        load_grouplens(tmp_path / "a")
    _write(tmp_path / "b" / "ratings.dat", "1::10::5::300\n1::20::3::yesterday\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 2: expected a numeric timestamp, got 'yesterday'"):
        load_grouplens(tmp_path / "b")
    _write(tmp_path / "c" / "u.data", U_DATA)
    _write(tmp_path / "c" / "u.item", U_ITEM_ROWS[0] + "\n10|Short|01-Jan-1995\n")
    with pytest.raises(DataError, match=r"u\.item line 2: expected 24 '\|'-separated fields"):
        load_grouplens(tmp_path / "c")


# -------------------------------------------------------------------------------------------- splits


def test_holdout_split_takes_the_chronological_tail() -> None:
    data = synthetic(n_users=200, n_items=300, seed=1, mean_length=20)
    split = split_holdout(data, n_holdout=10, min_train=5)
    n_evaluated = 0
    for seq, train, test in zip(data.sequences, split.train, split.test, strict=True):
        if len(seq) < 15:  # too short: everything is history, nothing to evaluate
            assert np.array_equal(train, seq) and len(test) == 0
            continue
        n_evaluated += 1
        assert np.array_equal(test, seq[-10:]) and np.array_equal(np.concatenate([train, test]), seq)
        assert not set(test.tolist()) & set(train.tolist())
    assert 0 < n_evaluated < data.n_users


def test_holdout_split_never_shows_a_test_item_in_history() -> None:
    # A user who re-watches: item 7 is both early in the history and in the test tail.
    data = synthetic(n_users=1, n_items=20, seed=0)
    data.sequences = [np.array([7, 1, 2, 3, 4, 5, 7, 8], dtype=np.int64)]
    split = split_holdout(data, n_holdout=2, min_train=3)
    assert split.test[0].tolist() == [7, 8]
    assert split.train[0].tolist() == [1, 2, 3, 4, 5]


def test_interaction_matrix_marks_each_interaction(ml100k: InteractionData) -> None:
    matrix = interaction_matrix(ml100k.sequences, ml100k.n_items)
    assert matrix.shape == (943, 1682) and matrix.dtype == np.float32
    assert matrix.sum() == 100_000 and set(np.unique(matrix)) == {0.0, 1.0}
    assert matrix[0, ml100k.sequences[0]].all()


# ----------------------------------------------------------------------------------------- synthetic


def _same(a: InteractionData, b: InteractionData) -> bool:
    return (
        len(a.sequences) == len(b.sequences)
        and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
        and np.array_equal(a.genres, b.genres)
        and np.array_equal(a.years, b.years)
    )


def test_synthetic_is_deterministic_per_seed() -> None:
    assert _same(synthetic(n_users=300, n_items=1000, seed=7), synthetic(n_users=300, n_items=1000, seed=7))
    assert not _same(synthetic(n_users=300, n_items=1000, seed=7), synthetic(n_users=300, n_items=1000, seed=8))


def test_synthetic_scales_to_100k_items_with_skewed_popularity() -> None:
    start = time.perf_counter()
    data = synthetic(n_users=2000, n_items=100_000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert data.n_items == 100_000 and data.genres.shape == (100_000, 12)
    assert 30 < data.n_interactions / data.n_users < 50  # mean_length=40
    counts = np.sort(np.bincount(np.concatenate(data.sequences), minlength=data.n_items))[::-1]
    assert counts[:1000].sum() > 0.3 * counts.sum()  # top 1% of items: a large share of interactions
    assert all(len(np.unique(s)) == len(s) for s in data.sequences)  # no user repeats an item


def test_synthetic_sequences_have_markov_structure() -> None:
    # Sequence models should have something to learn: item -> next item is far from random.
    data = synthetic(n_users=1000, n_items=2000, seed=3)
    pairs = np.concatenate([s[:-1] * data.n_items + s[1:] for s in data.sequences])
    prev_counts = np.bincount(pairs // data.n_items, minlength=data.n_items)
    best_next = np.zeros(data.n_items)
    np.maximum.at(best_next, pairs // data.n_items, np.bincount(pairs)[pairs])
    frequent = prev_counts >= 20
    # For frequently seen items, the single most common successor follows them > 20% of the time.
    assert np.median(best_next[frequent] / prev_counts[frequent]) > 0.2


def test_synthetic_tiny_catalog_still_valid() -> None:
    data = synthetic(n_users=20, n_items=3, seed=0, n_genres=0)
    assert data.genres.shape == (3, 0)
    assert all(1 <= len(s) <= 3 and len(set(s.tolist())) == len(s) for s in data.sequences)


def test_training_windows_are_every_cut_a_full_list_follows() -> None:
    from specrec.training.examples import window_index

    rng = np.random.default_rng(3)
    sequences = [np.arange(n) for n in rng.integers(0, 30, size=40)] + [np.arange(0)]
    windows = window_index(sequences, 10)
    expected = [(u, t) for u, seq in enumerate(sequences) for t in range(len(seq) - 9)]
    assert windows.dtype == np.int64 and [tuple(w) for w in windows.tolist()] == expected
