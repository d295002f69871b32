"""Item categories beside the semantic IDs (`semantic_ids/categories.json`): what a request's category filters
select by. Written from the data's genres when the artifacts are prepared; a catalog without any has none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from specrec.data.dataset import InteractionData
from specrec.semantic_ids.codebook import ARTIFACT_NAME

FILE = "categories.json"


def categories_path(artifacts: Path) -> Path:
    return Path(artifacts) / ARTIFACT_NAME / FILE


def save_categories(artifacts: Path, data: InteractionData) -> None:
    """Category name -> item ids, from the data's genres (written once; a temporary file renamed into place, so a
    reader never sees half of it)."""
    items = {name: [data.item_ids[i] for i in np.flatnonzero(data.genres[:, j])]
             for j, name in enumerate(data.genre_names)}
    path = categories_path(artifacts)
    tmp = path.with_name(f"{FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"categories": items}))
    tmp.replace(path)


def load_categories(artifacts: Path, item_ids: list[str]) -> dict[str, np.ndarray]:
    """Category name -> sorted item indices (positions in `item_ids`); empty when the artifacts have none."""
    path = categories_path(artifacts)
    if not path.is_file():
        return {}
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    found = json.loads(path.read_text())["categories"]
    return {name: np.array(sorted(index[i] for i in ids if i in index), dtype=np.int64) for name, ids in found.items()}
