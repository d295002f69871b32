"""MovieLens loaders: ML-100k read straight out of the recbole wheel, and GroupLens' own file formats."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specrec.data.dataset import DataError, InteractionData
from specrec.data.synthetic import synthetic
from specrec.paths import data_dir

RECBOLE_VERSION = "1.2.1"
_WHEEL_GLOB = f"recbole-{RECBOLE_VERSION}-*.whl"
_WHEEL_DIR_IN_ZIP = "recbole/dataset_example/ml-100k"

# The 19 genre flags of ML-100k's u.item, in column order (u.genre lists the same names).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
# Placeholders that mean "no information"; recbole's ml-100k.item even spells one of them "unkonwn".
_UNKNOWN = {"", "unknown", "unkonwn", "(no genres listed)"}
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
_DATE_YEAR = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")  # u.item release dates look like 01-Jan-1995


@dataclass
class _Catalog:
    item_ids: list[str]
    titles: list[str]
    years: list[float]
    genres: list[list[str]]  # genre names per item


@dataclass
class _Ratings:
    users: list[str]
    items: list[str]
    timestamps: np.ndarray  # float64, one per rating, in file order


# ---------------------------------------------------------------------------------------------- ML-100k


def load_movielens_100k(cache_dir: Path | None = None) -> InteractionData:
    """MovieLens-100k (943 users, 1682 items, 100k ratings) from the recbole wheel's ml-100k.inter/.item.

    The wheel is cached in ``cache_dir`` (default ``data_dir()/"wheels"``) and downloaded with pip on first
    use; the files are read from the zip in memory, never extracted. All ratings count as interactions.
    """
    wheel = recbole_wheel(cache_dir)
    try:
        with zipfile.ZipFile(wheel) as zf:
            inter_text = _read_member(zf, wheel, "ml-100k.inter")
            item_text = _read_member(zf, wheel, "ml-100k.item")
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a valid wheel (zip) file ({e}); delete it to download it again") from e
    try:
        ratings = _parse_recbole_inter(inter_text, "ml-100k.inter")
        catalog = _parse_recbole_item(item_text, "ml-100k.item")
    except DataError as e:
        raise DataError(f"{e} (file inside {wheel})") from e
    return _assemble("ml-100k", catalog, ratings)


def recbole_wheel(cache_dir: Path | None = None) -> Path:
    """Path of the cached recbole wheel, downloading it with ``pip download`` if it is not there yet."""
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir() / "wheels"
    cached = sorted(cache_dir.glob(_WHEEL_GLOB))
    if cached:
        return cached[0]
    return _download_wheel(cache_dir)


def _download_wheel(cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private temp dir and rename: a concurrent reader never sees a half-written wheel.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"recbole=={RECBOLE_VERSION}", "-d", tmp,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            reason = f"exit code {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            reason, ok = str(e), False
        wheels = sorted(Path(tmp).glob(_WHEEL_GLOB))
        if not ok or not wheels:
            raise DataError(
                f"could not download recbole=={RECBOLE_VERSION} with `{' '.join(cmd[:6])} ...` ({reason}). "
                f"Without network access, put recbole-{RECBOLE_VERSION}-py3-none-any.whl into {cache_dir} "
                f"(from `pip download --no-deps recbole=={RECBOLE_VERSION}` on another machine), "
                "or pass a GroupLens ml-100k/ml-1m directory instead (load_grouplens / a path as data spec)."
            )
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _tail(text: str, n_lines: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n_lines:]) or "no output"


def _read_member(zf: zipfile.ZipFile, wheel: Path, filename: str) -> str:
    member = f"{_WHEEL_DIR_IN_ZIP}/{filename}"
    try:
        raw = zf.read(member)
    except KeyError as e:
        raise DataError(f"{wheel}: has no {member}; expected the recbole {RECBOLE_VERSION} wheel") from e
    return _decode(raw)


def _parse_recbole_inter(text: str, source: str) -> _Ratings:
    # recbole atomic files name their columns in the header ("user_id:token"); locate columns by name.
    rows = _rows(text, source, "\t", header=True)
    cols = _header_columns(rows[0][1], source, required=["user_id", "item_id", "timestamp"])
    data = _check_widths(rows[1:], source, "tab", rows[0][1])
    return _ratings(data, source, cols["user_id"], cols["item_id"], cols["timestamp"])


def _parse_recbole_item(text: str, source: str) -> _Catalog:
    rows = _rows(text, source, "\t", header=True)
    cols = _header_columns(rows[0][1], source, required=["item_id"])
    data = _check_widths(rows[1:], source, "tab", rows[0][1])
    catalog = _Catalog([], [], [], [])
    for _, fields in data:
        title = fields[cols["movie_title"]] if "movie_title" in cols else ""
        year = fields[cols["release_year"]] if "release_year" in cols else ""
        genres = fields[cols["class"]].split() if "class" in cols else []
        _add_item(catalog, fields[cols["item_id"]], title, year if year.isdigit() else None, genres)
    return catalog


def _header_columns(header: list[str], source: str, required: list[str]) -> dict[str, int]:
    cols = {name.split(":", 1)[0].strip(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in cols]
    if missing:
        raise DataError(
            f"{source} line 1: expected a tab-separated header naming columns {', '.join(required)} "
            f"(like 'user_id:token'), missing {', '.join(missing)}; got {chr(9).join(header)!r}"
        )
    return cols


# ------------------------------------------------------------------------------------- GroupLens files


def load_grouplens(path: Path | str) -> InteractionData:
    """Load a GroupLens MovieLens directory (or any file inside it).

    Understands ML-100k's ``u.data`` + ``u.item`` and ML-1M's ``ratings.dat`` + ``movies.dat``. The item
    file is optional: without it the catalog is the set of rated items, with no titles/years/genres.
    Titles lose their trailing "(1995)", which becomes the year when the file has no separate date.
    """
    path = Path(path).expanduser()
    expected = "a GroupLens directory holding u.data + u.item (ML-100k) or ratings.dat + movies.dat (ML-1M)"
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; expected {expected}")
    directory = path if path.is_dir() else path.parent
    name = directory.resolve().name
    if (directory / "u.data").is_file():
        ratings = _parse_u_data(directory / "u.data")
        catalog = _parse_u_item(directory / "u.item", _u_genre_names(directory / "u.genre"))
    elif (directory / "ratings.dat").is_file():
        ratings = _parse_ratings_dat(directory / "ratings.dat")
        catalog = _parse_movies_dat(directory / "movies.dat")
    else:
        raise DataError(f"{directory}: found neither u.data nor ratings.dat; expected {expected}")
    return _assemble(name, catalog, ratings)


def _parse_u_data(path: Path) -> _Ratings:
    names = ["user_id", "item_id", "rating", "timestamp"]
    data = _check_widths(_rows(_read_text(path), str(path), "\t"), str(path), "tab", names)
    return _ratings(data, str(path), 0, 1, 3)


def _parse_ratings_dat(path: Path) -> _Ratings:
    names = ["UserID", "MovieID", "Rating", "Timestamp"]
    data = _check_widths(_rows(_read_text(path), str(path), "::"), str(path), "'::'", names)
    return _ratings(data, str(path), 0, 1, 3)


def _u_genre_names(path: Path) -> list[str]:
    """Genre column names from u.genre ("name|index" lines) if present, else the standard 19."""
    if not path.is_file():
        return ML100K_GENRES
    source = str(path)
    data = _check_widths(_rows(_read_text(path), source, "|"), source, "'|'", ["genre", "index"])
    for lineno, (_, index) in data:
        if not index.strip().isdigit():
            raise DataError(f"{source} line {lineno}: expected a genre's column index, got {index!r}")
    return [fields[0] for _, fields in sorted(data, key=lambda row: int(row[1][1]))]


def _parse_u_item(path: Path, genre_names: list[str]) -> _Catalog:
    catalog = _Catalog([], [], [], [])
    if not path.is_file():
        return catalog
    names = ["movie_id", "title", "release_date", "video_release_date", "imdb_url"] + [f"{g} flag" for g in genre_names]
    source = str(path)
    for lineno, fields in _check_widths(_rows(_read_text(path), source, "|"), source, "'|'", names):
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(f"{source} line {lineno}: expected genre flags 0 or 1, got {'|'.join(flags)!r}")
        date = _DATE_YEAR.match(fields[2].strip())
        genres = [g for g, flag in zip(genre_names, flags, strict=True) if flag == "1"]
        _add_item(catalog, fields[0], fields[1], date.group(1) if date else None, genres)
    return catalog


def _parse_movies_dat(path: Path) -> _Catalog:
    catalog = _Catalog([], [], [], [])
    if not path.is_file():
        return catalog
    source = str(path)
    rows = _check_widths(_rows(_read_text(path), source, "::"), source, "'::'", ["MovieID", "Title", "Genres"])
    for _, fields in rows:
        _add_item(catalog, fields[0], fields[1], None, fields[2].split("|"))
    return catalog


# -------------------------------------------------------------------------------------- shared parsing


def _read_text(path: Path) -> str:
    try:
        return _decode(path.read_bytes())
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e


def _decode(raw: bytes) -> str:
    # recbole ships UTF-8; GroupLens' own files are latin-1 (which never fails, so it is the fallback).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _rows(text: str, source: str, sep: str, header: bool = False) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-blank line; the header, if any, comes first."""
    # split("\n") rather than splitlines(): latin-1 text may hold \x85 or \x1c, which splitlines breaks on.
    rows = [
        (lineno, line.rstrip("\r").split(sep)) for lineno, line in enumerate(text.split("\n"), start=1) if line.strip()
    ]
    if not rows:
        raise DataError(f"{source}: is empty; expected {'a header and ' if header else ''}one record per line")
    return rows


def _check_widths(
    rows: list[tuple[int, list[str]]], source: str, sep_name: str, names: list[str]
) -> list[tuple[int, list[str]]]:
    width = len(names)
    for lineno, fields in rows:
        if len(fields) != width:
            raise DataError(
                f"{source} line {lineno}: expected {width} {sep_name}-separated fields "
                f"{', '.join(n.split(':', 1)[0] for n in names)}, got {len(fields)}"
            )
    return rows


def _ratings(rows: list[tuple[int, list[str]]], source: str, user_col: int, item_col: int, ts_col: int) -> _Ratings:
    users = [fields[user_col].strip() for _, fields in rows]
    items = [fields[item_col].strip() for _, fields in rows]
    stamps = [fields[ts_col].strip() for _, fields in rows]
    if not rows:
        raise DataError(f"{source}: has no ratings; expected one rating per line")
    try:
        timestamps = np.array(stamps, dtype=np.float64)  # one bulk conversion is ~10x faster than a loop
    except ValueError:
        timestamps = np.array([_float(s, source, lineno) for (lineno, _), s in zip(rows, stamps, strict=True)])
    for (lineno, _), user, item in zip(rows, users, items, strict=True):
        if not user or not item:
            raise DataError(f"{source} line {lineno}: expected non-empty user and item ids")
    return _Ratings(users, items, timestamps)


def _float(text: str, source: str, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{source} line {lineno}: expected a numeric timestamp, got {text!r}") from None


def _add_item(catalog: _Catalog, item_id: str, title: str, year: str | None, genres: list[str]) -> None:
    title = title.strip()
    if title.lower() in _UNKNOWN:
        title = ""
    # GroupLens titles carry the year ("Toy Story (1995)"); keep it in `years` only, as recbole does.
    match = _TITLE_YEAR.match(title)
    if match:
        title = match.group(1)
        year = year or match.group(2)
    catalog.item_ids.append(item_id.strip())
    catalog.titles.append(title)
    catalog.years.append(float(year) if year else float("nan"))
    catalog.genres.append([g for g in (g.strip() for g in genres) if g.lower() not in _UNKNOWN])


def _natural_key(identifier: str) -> tuple[int, int, str]:
    # Numeric ids sort as numbers ("2" < "10"), others after them as strings.
    return (0, int(identifier), "") if identifier.isdigit() else (1, 0, identifier)


def _assemble(name: str, catalog: _Catalog, ratings: _Ratings) -> InteractionData:
    """Index items (catalog order, then rated-but-uncatalogued ones) and users; sort each user by time."""
    item_ids = list(dict.fromkeys(catalog.item_ids))
    if len(item_ids) != len(catalog.item_ids):
        raise DataError(f"{name}: the item file lists some item id more than once")
    known = set(item_ids)
    extra = sorted({i for i in ratings.items if i not in known}, key=_natural_key)
    n_extra = len(extra)
    item_ids += extra
    item_index = {item: i for i, item in enumerate(item_ids)}

    genre_names = sorted({g for gs in catalog.genres for g in gs})
    genre_col = {g: j for j, g in enumerate(genre_names)}
    genres = np.zeros((len(item_ids), len(genre_names)), dtype=np.float32)
    for i, gs in enumerate(catalog.genres):
        genres[i, [genre_col[g] for g in gs]] = 1.0

    user_ids = sorted(set(ratings.users), key=_natural_key)
    user_index = {user: u for u, user in enumerate(user_ids)}
    users = np.fromiter((user_index[u] for u in ratings.users), dtype=np.int64, count=len(ratings.users))
    items = np.fromiter((item_index[i] for i in ratings.items), dtype=np.int64, count=len(ratings.items))
    # Two stable sorts = order by (user, timestamp, position in file): equal timestamps keep file order.
    order = np.argsort(ratings.timestamps, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    bounds = np.cumsum(np.bincount(users, minlength=len(user_ids)))[:-1]
    sequences = np.split(items[order], bounds)

    return InteractionData(
        name=name,
        item_ids=item_ids,
        titles=catalog.titles + [""] * n_extra,
        years=np.array(catalog.years + [np.nan] * n_extra, dtype=np.float32),
        genres=genres,
        genre_names=genre_names,
        user_ids=user_ids,
        sequences=[np.ascontiguousarray(s) for s in sequences],
    )


# ----------------------------------------------------------------------------------------- data specs

# Short names accepted in "synthetic:..." specs, next to synthetic()'s own argument names.
_SYNTHETIC_KEYS = {
    "users": "n_users", "items": "n_items", "seed": "seed", "clusters": "n_clusters",
    "mean_length": "mean_length", "length": "mean_length", "zipf_a": "zipf_a", "zipf": "zipf_a",
    "genres": "n_genres", "n_users": "n_users", "n_items": "n_items", "n_clusters": "n_clusters",
    "n_genres": "n_genres",
}  # fmt: skip


def load_dataset(spec: str) -> InteractionData:
    """Load data by spec: "ml-100k", "synthetic[:users=2000,items=100000,seed=0,...]", a directory of CSV/Parquet
    tables (specrec.data.tabular), or a GroupLens path."""
    if spec.strip().lower() == "ml-100k":
        return load_movielens_100k()
    if spec.startswith("synthetic"):
        return synthetic(**_synthetic_kwargs(spec))
    if not Path(spec).expanduser().exists():
        raise DataError(
            f"data spec {spec!r}: expected 'ml-100k', 'synthetic:users=N,items=M,seed=S', a directory with "
            "interactions.csv/.parquet (+ items.csv/.parquet), or a GroupLens directory (u.data + u.item, or "
            "ratings.dat + movies.dat)"
        )
    from specrec.data.tabular import is_tabular_dataset, load_tabular  # it builds on this module's helpers

    if is_tabular_dataset(Path(spec).expanduser()):
        return load_tabular(Path(spec))
    return load_grouplens(Path(spec))


def _synthetic_kwargs(spec: str) -> dict[str, int | float]:
    head, _, args = spec.partition(":")
    usage = (
        f"data spec {spec!r}: expected 'synthetic' or 'synthetic:key=value,...' with keys "
        "users, items, seed, clusters, mean_length, zipf_a, genres"
    )
    if head != "synthetic":
        raise DataError(usage)
    kwargs: dict[str, int | float] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or key not in _SYNTHETIC_KEYS:
            raise DataError(f"{usage}; got {part!r}")
        target = _SYNTHETIC_KEYS[key]
        try:
            kwargs[target] = float(value) if target == "zipf_a" else int(value)
        except ValueError:
            raise DataError(f"{usage}; {key} must be a number, got {value!r}") from None
    return kwargs
