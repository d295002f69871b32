"""`specrec batch` against the real stack (Triton via our launcher, the orchestrator; target-only for speed):
killed mid-run and restarted, it writes every user exactly once, each with plain greedy decoding's list."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness.stack import LocalStack, StackConfig
from specrec.batch_client import Journal, read_users
from specrec.decoding.plain import decode
from specrec.semantic_ids.vocab import BOS, REC

N_USERS = 60
N_ITEMS = 5


@pytest.fixture(scope="module")
def stack(tiny_artifacts):
    with LocalStack(StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="off")) as running:
        yield running


@pytest.fixture(scope="module")
def users_csv(tiny_artifacts, tmp_path_factory) -> Path:
    """N_USERS dataset users (space-separated histories) and one whose history the catalog has never seen."""
    path = tmp_path_factory.mktemp("batch") / "users.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "history"])
        for u in range(N_USERS):
            history = tiny_artifacts.split.train[u][-tiny_artifacts.profile.max_history:]
            w.writerow([f"u{u}", " ".join(tiny_artifacts.data.item_ids[i] for i in history)])
        w.writerow(["newcomer", "brand-new-item another-new-item"])
    return path


@pytest.fixture(scope="module")
def reference(tiny_artifacts, tiny_target) -> dict[str, list[str]]:
    prompts = [tiny_artifacts.prompt(u) for u in range(N_USERS)] + [[BOS, REC]]
    decoded = decode(tiny_target, tiny_artifacts.constraint(N_ITEMS), prompts)
    names = [f"u{u}" for u in range(N_USERS)] + ["newcomer"]
    return {name: [tiny_artifacts.data.item_ids[i] for i in d.items] for name, d in zip(names, decoded, strict=True)}


def batch_cmd(stack, users: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "specrec.cli", "batch", str(users), "--out", str(out), "--n", str(N_ITEMS),
            "--addr", stack.orchestrator_addr, "--no-progress", *extra]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_mid_run_and_restarted_writes_every_user_exactly_once(stack, users_csv, reference, tmp_path):
    out = tmp_path / "lists.jsonl"
    proc = subprocess.Popen(batch_cmd(stack, users_csv, out, "--concurrency", "2", "--batch-size", "4"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while lines(out) < 12 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    written = lines(out)
    assert 12 <= written < N_USERS + 1, f"the kill should land mid-run ({written} users written)"
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves: a torn last line
        f.write(b'{"user_id": "u59", "items": ["')
    done = subprocess.run(batch_cmd(stack, users_csv, out, "--concurrency", "4", "--batch-size", "8"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["user_id"] for r in records) == sorted(reference)  # every user, none twice
    for r in records:
        assert r["error_code"] is None and r["items"] == reference[r["user_id"]], r
        assert len(r["log_probs"]) == N_ITEMS and r["total_log_prob"] == pytest.approx(sum(r["log_probs"]))
    newcomer = next(r for r in records if r["user_id"] == "newcomer")
    assert newcomer["cold_start"] and newcomer["unknown_items"] == 2
    assert f"{N_USERS + 1} users" in done.stdout


def test_parquet_in_and_out(stack, users_csv, reference, tmp_path):
    import pyarrow as pa

    users = read_users(users_csv)[:6]
    table = pa.table({"user_id": [u.user_id for u in users], "history": [u.history for u in users]})
    pq.write_table(table, tmp_path / "users.parquet")
    out = tmp_path / "lists.parquet"
    done = subprocess.run(batch_cmd(stack, tmp_path / "users.parquet", out), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out).to_pylist()
    assert {r["user_id"]: r["items"] for r in rows} == {u.user_id: reference[u.user_id] for u in users}


def test_duplicate_users_are_refused_before_any_call(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text('user_id,history\na,"[""1"", ""2""]"\na,3\n')
    with pytest.raises(ValueError, match="appears twice"):
        read_users(path)
    (tmp_path / "ok.csv").write_text('user_id,history\na,"[""1"", ""2""]"\nb,\n')
    assert [u.history for u in read_users(tmp_path / "ok.csv")] == [["1", "2"], []]


def test_a_journal_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"user_id": "a"}\n{"user_id": "b"}\n{"user_id": "c", "ite')
    journal = Journal(path)
    journal.close()
    assert journal.done == {"a", "b"} and path.read_text().endswith('"b"}\n')
