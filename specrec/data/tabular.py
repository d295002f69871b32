"""Bring-your-own data: interactions and an optional item catalog from CSV or Parquet files (pyarrow).

A dataset directory holds `interactions.csv` or `interactions.parquet` (columns `user_id`, `item_id`, and
optionally `timestamp`: any number; without it, file order is time order) and, optionally, `items.csv` or
`items.parquet` (`item_id`, and optionally `title`, `year`, `genres`: a list, or a string split on "|").
Items rated but missing from the catalog join it untitled; catalog items nobody rated stay in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specrec.data.dataset import DataError, InteractionData
from specrec.data.movielens import _add_item, _assemble, _Catalog, _Ratings

SUFFIXES = (".parquet", ".csv")


def find_table(directory: Path, stem: str) -> Path | None:
    """`directory/stem.parquet` or `directory/stem.csv`, whichever exists (Parquet first)."""
    return next((directory / f"{stem}{s}" for s in SUFFIXES if (directory / f"{stem}{s}").is_file()), None)


def is_tabular_dataset(path: Path) -> bool:
    return path.is_dir() and find_table(path, "interactions") is not None


def read_table(path: Path) -> dict[str, list]:
    """The file's columns as Python lists (CSV values as strings; Parquet values as typed)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:  # every column as text: ids like "007" must not become 7
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={name: "string" for name in _csv_header(path)}))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable {path.suffix[1:]} table ({e})") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [c.strip() for c in f.readline().rstrip("\r\n").split(",")]


def _column(table: dict[str, list], name: str, path: Path) -> list:
    if name not in table:
        raise DataError(f"{path}: no {name!r} column (columns: {', '.join(table) or 'none'})")
    return table[name]


def load_tabular(directory: Path | str) -> InteractionData:
    """The dataset in `directory` (see the module doc); its name is the directory's."""
    directory = Path(directory).expanduser()
    inter_path = find_table(directory, "interactions")
    if inter_path is None:
        raise DataError(f"{directory}: no interactions.parquet or interactions.csv")
    ratings = _ratings(read_table(inter_path), inter_path)
    items_path = find_table(directory, "items")
    catalog = _catalog(read_table(items_path), items_path) if items_path else _Catalog([], [], [], [])
    return _assemble(directory.resolve().name, catalog, ratings)


def _ratings(table: dict[str, list], path: Path) -> _Ratings:
    users = [_text(v) for v in _column(table, "user_id", path)]
    items = [_text(v) for v in _column(table, "item_id", path)]
    if not users:
        raise DataError(f"{path}: has no interactions")
    if "" in users or "" in items:
        row = (users.index("") if "" in users else items.index("")) + 1
        raise DataError(f"{path} row {row}: empty user_id or item_id")
    stamps = table.get("timestamp")
    try:
        times = np.arange(len(users), dtype=np.float64) if stamps is None else np.array(
            [float(s) for s in stamps], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: timestamp must be numeric in every row") from None
    return _Ratings(users, items, times)


def _catalog(table: dict[str, list], path: Path) -> _Catalog:
    ids = [_text(v) for v in _column(table, "item_id", path)]
    titles = table.get("title") or [""] * len(ids)
    years = table.get("year") or [None] * len(ids)
    genres = table.get("genres") or [[] for _ in ids]
    catalog = _Catalog([], [], [], [])
    for item_id, title, year, gs in zip(ids, titles, years, genres, strict=True):
        names = gs if isinstance(gs, list) else (str(gs).split("|") if gs else [])
        _add_item(catalog, item_id, _text(title), _text(year) or None, [str(g) for g in names])
    return catalog


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():  # a Parquet year 1995.0 is "1995"
        return str(int(value))
    return str(value).strip()
