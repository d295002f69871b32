"""bench/ab.py's paired summary: B against A per user and repeat, each arm against its own plain decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ab import report, summarize, write_results


def _rec(arm: str, policy: str, user: int, repeat: int, ms: float, items: list[str]) -> dict:
    tree = policy != "off"
    return {"arm": arm, "policy": policy, "drafter": "model" if tree else "-", "user": user, "repeat": repeat,
            "latency_ms": ms, "items": items, "committed": 30, "rounds": 5 if tree else 30, "tree_rounds": 5 * tree,
            "start_trees": 1 * tree, "ready_trees": 3 * tree, "draft_ms": 10.0 * tree}


def test_b_against_a_is_paired_and_each_arm_is_checked_against_its_own_plain() -> None:
    recs = []
    for rep in range(2):
        for user, base in ((0, 100.0), (1, 300.0), (2, 200.0)):  # users far apart: only pairing sees B's 10%
            recs += [_rec("A", "off", user, rep, 2 * base, ["x"]), _rec("B", "off", user, rep, 2 * base, ["y"]),
                     _rec("A", "adaptive", user, rep, base, ["x"]),
                     _rec("B", "adaptive", user, rep, base / 1.1, ["y"] if user else ["z"])]
    rows = {r["policy"]: r for r in summarize(recs, [("off", ""), ("adaptive", "model")], 2)}
    row = rows["adaptive"]
    assert row["b_faster_pairwise"] == pytest.approx(1.1) and row["b_faster_mean"] == pytest.approx(1.1)
    assert row["A"]["speedup_pairwise"] == pytest.approx(2.0) and row["B"]["speedup_pairwise"] == pytest.approx(2.2)
    assert row["A"]["unlike_plain"] == 0 and row["B"]["unlike_plain"] == 2  # user 0's B list is not B's plain list
    assert row["lists_differing_between_arms"] == 6
    # 3 ready of the 4 tree rounds after START (a START tree is never ready, as in bench/speedup.py)
    assert row["A"]["tau"] == pytest.approx(6.0) and row["A"]["ready"] == pytest.approx(0.75)
    assert [p["n"] for p in row["per_repeat"]] == [3, 3]
    res = {"label": "t", "date": "d", "machine": {"cpu_model": "c", "loadavg_start": [0, 0, 0]},
           "arms": {"A": {"what": "a"}, "B": {"what": "b"}}, "command": "c", "git": "g",
           "args": {"profile": "bench", "users": 3, "repeats": 2}, "measure_s": 1.0, "rows": list(rows.values())}
    assert "| adaptive | model | 200.0 | 181.8 | 1.100x | 1.100x | 2.00x / 2.20x |" in report(res)


def test_a_label_with_a_dot_keeps_its_name(tmp_path: Path) -> None:
    write_results({"x": 1}, tmp_path / "ab-2026-12-07-gil-0.2", lambda res: f"x = {res['x']}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab-2026-12-07-gil-0.2.json", "ab-2026-12-07-gil-0.2.md"]
