"""Bring-your-own data from CSV / Parquet (specrec.data.tabular): real MovieLens-100k written out as tables in
shuffled row order must load back as the same catalog and the same chronological sequences."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specrec.data import DataError, InteractionData, load_dataset, load_movielens_100k

N_USERS = 120


@pytest.fixture(scope="module")
def ml100k() -> InteractionData:
    return load_movielens_100k()


def write_tables(data: InteractionData, directory: Path, fmt: str) -> None:
    """The first N_USERS users' interactions (timestamp = position, rows shuffled) and the whole catalog."""
    rows = [(data.user_ids[u], data.item_ids[i], float(t) * 60 + 1e9)
            for u in range(N_USERS) for t, i in enumerate(data.sequences[u])]
    rows = [rows[k] for k in np.random.default_rng(0).permutation(len(rows))]
    items = {"item_id": data.item_ids, "title": data.titles,
             "year": [None if np.isnan(y) else int(y) for y in data.years],
             "genres": [[data.genre_names[j] for j in np.flatnonzero(g)] for g in data.genres]}
    directory.mkdir(parents=True)
    if fmt == "parquet":
        pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                 "timestamp": [r[2] for r in rows]}), directory / "interactions.parquet")
        pq.write_table(pa.table(items), directory / "items.parquet")
        return
    with open(directory / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
    with open(directory / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "year", "genres"])
        w.writerows(zip(items["item_id"], items["title"], [y or "" for y in items["year"]],
                        ["|".join(g) for g in items["genres"]], strict=True))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_load_back_as_the_same_catalog_and_sequences(ml100k, tmp_path, fmt):
    write_tables(ml100k, tmp_path / "shop", fmt)
    data = load_dataset(str(tmp_path / "shop"))
    assert data.name == "shop" and data.item_ids == ml100k.item_ids and data.titles == ml100k.titles
    assert data.genre_names == ml100k.genre_names and np.array_equal(data.genres, ml100k.genres)
    assert np.array_equal(np.nan_to_num(data.years), np.nan_to_num(ml100k.years))
    assert data.user_ids == ml100k.user_ids[:N_USERS]
    for u in range(N_USERS):
        assert np.array_equal(data.sequences[u], ml100k.sequences[u]), u


def test_interactions_alone_make_an_untitled_catalog_in_file_order(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "interactions.csv").write_text("user_id,item_id\nu1,007\nu2,b\nu1,a\nu1,b\n")
    data = load_dataset(str(tmp_path / "d"))
    assert data.item_ids == ["007", "a", "b"] and data.titles == ["", "", ""]  # ids stay text: "007"
    index = data.item_index()
    assert [data.item_ids[i] for i in data.sequences[0]] == ["007", "a", "b"]  # no timestamp: file order
    assert list(data.sequences[1]) == [index["b"]]


def test_a_missing_column_is_named(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "interactions.csv").write_text("user,item_id\nu1,a\n")
    with pytest.raises(DataError, match="no 'user_id' column"):
        load_dataset(str(tmp_path / "d"))
