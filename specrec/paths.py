"""Where specrec keeps downloaded data and trained artifacts (root from SPECREC_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def specrec_home() -> Path:
    """Cache root: $SPECREC_HOME, else $XDG_CACHE_HOME/specrec, else ~/.cache/specrec."""
    if env := os.environ.get("SPECREC_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "specrec"


def data_dir() -> Path:
    return specrec_home() / "data"


def artifact_dir(dataset: str, profile: str) -> Path:
    """Models and semantic IDs trained for one dataset and profile live together."""
    return specrec_home() / "artifacts" / dataset / profile
