"""`specrec batch`: lists for a whole user base through a running orchestrator's RecommendBatch.

Users (user_id, history) come from CSV or Parquet; results go to JSONL or Parquet, one record per user, each
user exactly once across crashes: every record is appended to a journal as its answer arrives (one write,
flushed), a restart reads the journal, drops a torn last line and asks only for the users it lacks. A user
refused for load (RESOURCE_EXHAUSTED, UNAVAILABLE) is retried after the server's hint; any other refusal is
that user's record (with the error), so no user is lost silently.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

RETRYABLE = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
MAX_ATTEMPTS = 5  # per user, for load refusals
MAX_BATCH = 1000  # users per RecommendBatch call the orchestrator takes (RecommendBatchRequest.requests)
RECORD_FIELDS = ("user_id", "request_id", "items", "log_probs", "total_log_prob", "cold_start", "unknown_items",
                 "error_code", "error_message")


@dataclass(frozen=True)
class User:
    user_id: str
    history: list[str]


def read_users(path: Path) -> list[User]:
    """Users from CSV or Parquet: a `user_id` column and an optional `history` column (item ids, oldest first:
    a list in Parquet; in CSV space-separated, or a JSON list). Duplicate user ids are refused: the output has
    one record per user."""
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _csv_rows(path)
    users, seen = [], set()
    for n, row in enumerate(rows, 1):
        if "user_id" not in row:
            raise ValueError(f"{path}: no user_id column")
        uid = str(row["user_id"])
        if uid in seen:
            raise ValueError(f"{path}: user_id {uid!r} appears twice (row {n}); one record per user")
        seen.add(uid)
        users.append(User(uid, _history(row.get("history"))))
    return users


def _csv_rows(path: Path) -> Iterator[dict]:
    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    yield from pq.read_table(path).to_pylist()


def _history(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    return [str(v) for v in json.loads(text)] if text.startswith("[") else text.split()


class Journal:
    """Append-only JSONL of finished users; what a restart resumes from."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            self._recover()
        self.file = open(path, "a")  # noqa: SIM115 - open for the run, closed by close()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]  # a kill mid-write leaves a torn last line: it was not done
        if len(whole) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        self.done = {json.loads(line)["user_id"] for line in whole.decode().splitlines() if line.strip()}

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")  # one write per record: a line is whole or torn, never mixed
        self.file.flush()
        self.done.add(record["user_id"])

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def record_of(user: User, result: pb.RecommendBatchResponse) -> dict:
    if result.WhichOneof("outcome") == "error":
        e = result.error
        return dict(user_id=user.user_id, request_id=e.request_id, items=[], log_probs=[], total_log_prob=None,
                    cold_start=None, unknown_items=None, error_code=e.code, error_message=e.message)
    r = result.response
    return dict(user_id=user.user_id, request_id=r.request_id, items=[i.item_id for i in r.items],
                log_probs=[i.log_prob for i in r.items], total_log_prob=r.total_log_prob,
                cold_start=r.history.cold_start, unknown_items=r.history.unknown_items, error_code=None,
                error_message=None)


@dataclass
class BatchOptions:
    num_items: int = 10
    policy: str = ""  # the server's default
    concurrency: int = 16  # users decoding at once
    batch_size: int = 64  # users per RecommendBatch call
    timeout_s: float = 600.0


async def generate(addr: str, users: list[User], journal: Journal, opts: BatchOptions,
                   on_done: Callable[[int], None] = lambda n: None) -> None:
    """Lists for every user not yet in the journal; retries load refusals, records every other outcome."""
    pending = [u for u in users if u.user_id not in journal.done]
    chunks = [pending[i:i + opts.batch_size] for i in range(0, len(pending), opts.batch_size)]
    per_call = max(1, min(opts.concurrency, opts.batch_size))
    gate = asyncio.Semaphore(max(1, opts.concurrency // per_call))
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def run_chunk(chunk: list[User]) -> None:
            async with gate:
                await _serve_chunk(stub, chunk, journal, opts, per_call, on_done)

        await asyncio.gather(*(run_chunk(c) for c in chunks))


async def _serve_chunk(stub: pb_grpc.RecommenderServiceStub, chunk: list[User], journal: Journal, opts: BatchOptions,
                       per_call: int, on_done: Callable[[int], None]) -> None:
    attempts: dict[str, int] = {}
    while chunk:
        retry, wait_ms = [], 0
        request = pb.RecommendBatchRequest(concurrency=per_call, requests=[
            pb.RecommendRequest(history=u.history, num_items=opts.num_items,
                                options=pb.DecodingOptions(policy=opts.policy)) for u in chunk])
        answered: set[int] = set()
        try:
            async for result in stub.RecommendBatch(request, timeout=opts.timeout_s):
                user = chunk[result.index]
                answered.add(result.index)
                if _should_retry(result, attempts, user):
                    retry.append(user)
                    wait_ms = max(wait_ms, result.error.retry_after_ms)
                    continue
                journal.write(record_of(user, result))
                on_done(1)
        except grpc.aio.AioRpcError as e:  # the call broke: its unanswered users go again
            if e.code().name not in RETRYABLE | {"DEADLINE_EXCEEDED"}:
                raise
            lost = [u for i, u in enumerate(chunk) if i not in answered]
            for u in lost:
                attempts[u.user_id] = attempts.get(u.user_id, 0) + 1
                if attempts[u.user_id] >= MAX_ATTEMPTS:
                    raise
            retry += lost
            wait_ms = max(wait_ms, 500)
        chunk = retry
        if chunk:
            await asyncio.sleep(wait_ms / 1000)


def _should_retry(result: pb.RecommendBatchResponse, attempts: dict[str, int], user: User) -> bool:
    if result.WhichOneof("outcome") != "error" or result.error.code not in RETRYABLE:
        return False
    attempts[user.user_id] = attempts.get(user.user_id, 0) + 1
    return attempts[user.user_id] < MAX_ATTEMPTS


def write_parquet(journal_path: Path, out: Path) -> None:
    """The finished journal as a Parquet table (one row per user), written to a temporary name then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in journal_path.read_text().splitlines() if line.strip()]
    table = pa.Table.from_pylist(records, schema=pa.schema([
        ("user_id", pa.string()), ("request_id", pa.string()), ("items", pa.list_(pa.string())),
        ("log_probs", pa.list_(pa.float64())), ("total_log_prob", pa.float64()), ("cold_start", pa.bool_()),
        ("unknown_items", pa.int32()), ("error_code", pa.string()), ("error_message", pa.string())]))
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)


def journal_path_for(out: Path) -> Path:
    """JSONL output is its own journal; Parquet output is built from a journal beside it at the end."""
    return out if out.suffix != ".parquet" else out.with_name(out.name + ".journal.jsonl")


def run(addr: str, users_path: Path, out: Path, opts: BatchOptions, progress: bool = True) -> dict[str, int]:
    """The whole job: read users, resume from the journal, generate, finish the output. Counts by outcome."""
    from tqdm import tqdm

    users = read_users(users_path)
    journal = Journal(journal_path_for(out))
    bar = tqdm(total=len(users), initial=len(journal.done & {u.user_id for u in users}), unit="user",
               disable=not progress, smoothing=0.1, dynamic_ncols=True)
    try:
        asyncio.run(generate(addr, users, journal, opts, on_done=bar.update))
    finally:
        bar.close()
        journal.close()
    if out.suffix == ".parquet":
        write_parquet(journal.path, out)
    return summarise(journal.path)


def summarise(journal_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in journal_path.read_text().splitlines():
        code = json.loads(line)["error_code"] or "OK"
        counts[code] = counts.get(code, 0) + 1
    return counts
