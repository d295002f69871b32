"""Fault tests' shared parts: reference lists, a stack that takes a model repository or a foreign drafter,
Triton's processes, live-session counts, and the tally every scenario records.

Set SPECREC_CHAOS_REPORT=path and every scenario appends one JSON line with its counts (bench/reliability.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from harness.loadgen import Tally, recommend_request
from harness.stack import LocalStack, Process, StackConfig, free_port, triton_ready
from specrec.decoding.plain import decode
from target_service.launch import DEFAULT_REPOSITORY, MODEL_NAME, STUB

N_USERS = 24
TIMEOUT_S = 60.0  # a request with no answer after this long counts as hung


@pytest.fixture(scope="session")
def reference(tiny_artifacts, tiny_target) -> dict[int, list[str]]:
    """Plain greedy lists (item ids) of the first N_USERS users, computed in process: the lossless truth."""
    users = list(range(N_USERS))
    decoded = decode(tiny_target, tiny_artifacts.constraint(), [tiny_artifacts.prompt(u) for u in users])
    return {u: [tiny_artifacts.data.item_ids[i] for i in d.items] for u, d in zip(users, decoded, strict=True)}


def requests_for(arts, users, policy: str = "") -> list[tuple[int, object]]:
    def history(u: int) -> list[str]:
        return [arts.data.item_ids[i] for i in arts.split.train[u][-arts.profile.max_history:]]

    return [(u, recommend_request(history(u), 10, policy)) for u in users]


class ChaosStack(LocalStack):
    """LocalStack that can serve another model repository and talk to a drafter it did not start."""

    def __init__(self, config: StackConfig, model_repository: Path | None = None, draft_addr: str | None = None):
        if config.log_dir is None:  # one directory per stack: the services' logs are the evidence
            config.log_dir = Path(tempfile.mkdtemp(prefix="specrec-chaos-"))
        super().__init__(config)
        self.model_repository = model_repository
        if draft_addr is not None:
            self.draft_addr = draft_addr

    def start_target(self) -> None:
        old_log = self.log_dir / "target.log"
        if "target" in self.procs and old_log.exists():  # a restart: keep the dead server's log as evidence
            old_log.rename(self.log_dir / f"target-{time.time_ns()}.log")
        if self.model_repository is None:
            return super().start_target()
        port = self.target_addr.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "target_service.launch", "--artifacts", str(self.config.artifacts),
                "--model-repository", str(self.model_repository), "--grpc-port", port,
                "--http-port", str(free_port()), "--metrics-port", str(free_port())]
        self.procs["target"] = Process("target", args, self._env(), self.log_dir)
        self._wait("target", lambda: triton_ready(self.target_addr), 180)

    def restart_orchestrator(self) -> None:
        """A fresh orchestrator (new backoff state) against the same target and drafter."""
        self.procs.pop("orchestrator").stop()
        self.start_orchestrator()


def model_repository(root: Path, max_sequences: int | None = None, **oldest: object) -> Path:
    """A copy of the real model repository with the live-sequence cap and oldest-batcher fields changed."""
    shutil.copytree(DEFAULT_REPOSITORY, root, dirs_exist_ok=True, symlinks=True)
    path = root / MODEL_NAME / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for key, value in oldest.items():
        field = getattr(config.sequence_batching.oldest, key)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(config.sequence_batching.oldest, key, value)
    if max_sequences is not None:
        config.parameters["max_sequences"].string_value = str(max_sequences)
    path.write_text(text_format.MessageToString(config))
    return root


def triton_processes(stack: LocalStack) -> tuple[psutil.Process, list[psutil.Process]]:
    """(tritonserver, its Python backend stubs): children of the launcher process."""
    children = psutil.Process(stack.procs["target"].proc.pid).children(recursive=True)
    server = next(p for p in children if p.name() == "tritonserver")
    stubs = []
    for p in children:
        try:  # a killed stub Triton has not reaped yet is a zombie: gone, for our purposes
            if p.status() != psutil.STATUS_ZOMBIE and STUB in " ".join(p.cmdline()):
                stubs.append(p)
        except psutil.Error:
            pass
    return server, stubs


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def record(scenario: str, tally: Tally, **extra: object) -> None:
    """Print the counts (pytest -s shows them) and append them to $SPECREC_CHAOS_REPORT if set."""
    print(f"[chaos] {scenario}: {tally.summary()}")
    path = os.environ.get("SPECREC_CHAOS_REPORT")
    if path:
        row = {"scenario": scenario, "sent": tally.sent, "completed": tally.completed, "erred": tally.erred,
               "cancelled": tally.cancelled, "hung": tally.hung, "wrong": tally.wrong, "unclear": tally.unclear,
               "lost": tally.lost, "codes": dict(tally.codes), **extra}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
