"""bench/drafter_ablations.py --merge: runs made side by side become one table, each variant x seed x shape once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.drafter_ablations import EVAL, merge


def _run(path: Path, taus: dict[tuple[str, int], float], started: str) -> Path:
    records = [{"profile": "bench", "variant": v, "seed": s, "shape": shape, "tau": tau + i * 0.1}
               for (v, s), tau in taus.items() for i, shape in enumerate(EVAL.columns)]
    trainings = [{"variant": v, "seed": s, "trained": True, "seconds": 100.0} for v, s in taus]
    meta = {"dataset": "ml-100k", "profile": "bench", "seeds": [0], "variants": [], "steps": 1000, "data_seed": 0,
            "threads": 1, "users": 189, "command": "run", "started": started}
    path.write_text(json.dumps({**meta, "records": records, "trainings": trainings}))
    return path


def test_merged_runs_give_each_variant_its_seeds_once(tmp_path: Path) -> None:
    a = _run(tmp_path / "a.json", {("default", 0): 6.0, ("sinkhorn", 0): 5.5}, "2026-12-07T10:00")
    b = _run(tmp_path / "b.json", {("default", 0): 9.9, ("default", 1): 6.2, ("sinkhorn", 1): 5.7}, "2026-12-07T11:00")
    merge(argparse.Namespace(out=tmp_path / "merged"), [a, b])
    md = (tmp_path / "merged.md").read_text()
    first = EVAL.columns[0]
    assert "| default | 2 | 6.100 (6.000-6.200) |" in md  # run a's seed 0 kept, b's duplicate dropped
    assert "| sinkhorn | 2 | 5.600 (5.500-5.700) | -0.500 |" in md, md
    out = json.loads((tmp_path / "merged.json").read_text())
    assert len(out["records"]) == 4 * len(EVAL.columns) and out["seeds"] == [0, 1]
    assert out["variants"] == ["default", "sinkhorn"] and first in {r["shape"] for r in out["records"]}
