"""Launcher and target client against a real tritonserver serving the echo stand-in model."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from specrec.target_client import (
    TargetClient,
    TargetError,
    TargetInvalidArgument,
    TargetOverloaded,
    TargetSequenceUnknown,
    TargetUnavailable,
)
from target_service import launch
from target_service.launch import MODEL_NAME, TritonLaunchError, TritonServer

ECHO_MODEL = Path(__file__).parent / "fixtures" / "echo_repository" / MODEL_NAME / "1" / "model.py"
ECHO_SLOW_TOKEN = 999_999  # the echo model's SLOW_TOKEN (it is loaded by Triton, not importable here)
REAL_CONFIG = launch.DEFAULT_REPOSITORY / MODEL_NAME / "config.pbtxt"


def echo_repository(root: Path) -> Path:
    """The real config.pbtxt beside the echo model.py: the contract under test is the real one."""
    (root / MODEL_NAME / "1").mkdir(parents=True)
    shutil.copy(REAL_CONFIG, root / MODEL_NAME / "config.pbtxt")
    shutil.copy(ECHO_MODEL, root / MODEL_NAME / "1" / "model.py")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    running = TritonServer(echo_repository(tmp_path_factory.mktemp("echo"))).start()
    yield running
    assert running.stop() == 0, "a test left a sequence open (Triton waited for it to END)"


# --- pieces that need no server ---------------------------------------------------------


def test_finds_triton_and_assembles_the_python_backend() -> None:
    install = launch.find_triton()
    assert install.binary.is_file()
    assert install.backend_dir is not None
    names = {p.name for p in (install.backend_dir / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"} <= names


def test_instance_group_is_rewritten_in_a_copy_only(tmp_path: Path) -> None:
    source = echo_repository(tmp_path / "src")
    before = (source / MODEL_NAME / "config.pbtxt").read_text()
    copy = launch.prepare_repository(source, instances=3, device="cuda:1")
    config = text_format.Parse((copy / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    (group,) = config.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (3, model_config_pb2.ModelInstanceGroup.KIND_GPU, [1])
    assert config.sequence_batching.oldest.max_candidate_sequences > 0  # the rest survived the rewrite
    assert (source / MODEL_NAME / "config.pbtxt").read_text() == before
    assert launch.prepare_repository(source) == source  # nothing to rewrite: served as is
    shutil.rmtree(copy)


def test_max_sequences_moves_tritons_slots_and_the_models_cap_together(tmp_path: Path) -> None:
    """The chart's triton.maxSequences: Triton's max_candidate_sequences and the model's own cap stay equal."""
    source = tmp_path / "repo"
    shutil.copytree(launch.DEFAULT_REPOSITORY, source)
    copy = launch.prepare_repository(source, max_sequences=200)
    config = text_format.Parse((copy / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.sequence_batching.oldest.max_candidate_sequences == 200
    assert config.parameters["max_sequences"].string_value == "200"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU  # untouched
    shutil.rmtree(copy)


def test_the_batchers_wait_is_rewritten_in_a_copy(tmp_path: Path) -> None:
    """--queue-delay-us: a sequence running alone pays the sequence batcher's wait every round."""
    source = tmp_path / "repo"
    shutil.copytree(launch.DEFAULT_REPOSITORY, source)
    copy = launch.prepare_repository(source, queue_delay_us=0)
    config = text_format.Parse((copy / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    original = text_format.Parse((source / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert original.sequence_batching.oldest.max_queue_delay_microseconds == 500
    assert config.sequence_batching.oldest.max_queue_delay_microseconds == 0
    assert config.sequence_batching.oldest.max_candidate_sequences == 64  # the rest survived
    shutil.rmtree(copy)


def test_trace_flags_point_at_the_otlp_http_endpoint() -> None:
    args = launch.trace_args("http://collector:4318", rate=10)
    assert "opentelemetry,url=collector:4318/v1/traces" in args
    assert "rate=10" in args and "mode=opentelemetry" in args
    assert launch.trace_args(None, rate=1) == []


def test_nonexistent_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonLaunchError, match="does not exist"):
        TritonServer(tmp_path / "missing").start()
    # The CLI says the same and exits 2 instead of printing a traceback.
    assert launch.main(["--model-repository", str(tmp_path / "missing"), "--grpc-port", "0"]) == 2


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    # Triton itself hangs when it cannot bind, so the launcher must notice first.
    with socket.socket() as busy:
        busy.bind(("", 0))
        port = busy.getsockname()[1]
        with pytest.raises(TritonLaunchError, match=f"port {port} is already in use"):
            TritonServer(echo_repository(tmp_path), grpc_port=port).start()


@pytest.mark.parametrize(
    ("status", "message", "kind", "code"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", TargetUnavailable, "UNAVAILABLE"),
        ("StatusCode.UNAVAILABLE", "RESOURCE_EXHAUSTED: 64 live sequences", TargetOverloaded, "RESOURCE_EXHAUSTED"),
        ("StatusCode.UNAVAILABLE", "exceeds maximum queue size", TargetOverloaded, "RESOURCE_EXHAUSTED"),
        ("StatusCode.INVALID_ARGUMENT", "sequence 3 has no state here", TargetSequenceUnknown, "INVALID_ARGUMENT"),
        ("StatusCode.INVALID_ARGUMENT", "parent 4 of node 2 is not earlier", TargetInvalidArgument, "INVALID_ARGUMENT"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", TargetError, "DEADLINE_EXCEEDED"),
        (None, "client-side problem", TargetError, "UNKNOWN"),
    ],
)
def test_triton_errors_map_to_exceptions(status: str | None, message: str, kind: type, code: str) -> None:
    from tritonclient.utils import InferenceServerException

    from specrec.target_client import map_error

    error = map_error(InferenceServerException(message, status), "host:1", 3)
    assert type(error) is kind and error.code == grpc.StatusCode[code]
    assert "host:1" in str(error) and message in str(error)


# --- against a running server -----------------------------------------------------------


@pytest.mark.slow
def test_failing_model_reports_triton_log(tmp_path: Path) -> None:
    repo = echo_repository(tmp_path)
    (repo / MODEL_NAME / "1" / "model.py").write_text("raise RuntimeError('no weights here')\n")
    with pytest.raises(TritonLaunchError, match="no weights here"):
        TritonServer(repo).start(timeout=60)


@pytest.mark.slow
async def test_round_trips_with_start_and_end(server: TritonServer) -> None:
    async with TargetClient(server.grpc_url) as client:
        assert await client.ready()
        # Tree: 0 and 2 hang off the root, 1 under 0; the echo accepts the first-child chain 0 -> 1.
        first = await client.verify(11, [7, 8, 9], [-1, 0, -1], context=[1, 2, 3], start=True, n_items=4)
        assert first.accepted_tokens == [7, 8, 3] and first.accepted_nodes == [0, 1]
        assert (first.done, first.live_sequences) == (False, 1)
        other = await client.verify(12, [], [], context=[5], start=True)  # empty tree: one plain step
        assert (other.accepted_tokens, other.accepted_nodes, other.live_sequences) == ([1], [], 2)
        second = await client.verify(11, [4], [-1], headers={"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
        assert second.accepted_tokens == [4, 6] and second.done  # 4 tokens since START = n_items
        await client.end(11)
        last = await client.verify(12, [], [], end=True)
        assert last.live_sequences == 0
        await client.end(12)  # already gone: a no-op


@pytest.mark.slow
async def test_concurrent_sequences_keep_their_own_state(server: TritonServer) -> None:
    async def run(client: TargetClient, seq_id: int) -> list[int]:
        await client.verify(seq_id, [], [], context=[seq_id] * seq_id, start=True)
        for _ in range(5):
            await client.verify(seq_id, [seq_id], [-1])
        outcome = await client.verify(seq_id, [], [], end=True)
        return outcome.accepted_tokens

    async with TargetClient(server.grpc_url) as client:
        bonuses = await asyncio.gather(*(run(client, seq_id) for seq_id in range(100, 108)))
    # Bonus = committed length: seq_id context tokens + 1 (start) + 5 rounds x 2.
    assert bonuses == [[seq_id + 11] for seq_id in range(100, 108)]


@pytest.mark.slow
async def test_unknown_sequence_without_context_is_invalid_argument(server: TritonServer) -> None:
    async with TargetClient(server.grpc_url) as client:
        with pytest.raises(TargetSequenceUnknown) as raised:
            await client.verify(999, [1], [-1])
    assert isinstance(raised.value, TargetInvalidArgument)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence 999" in str(raised.value) and "CONTEXT" in str(raised.value)


@pytest.mark.slow
async def test_lost_sequence_is_rebuilt_from_context(server: TritonServer) -> None:
    async with TargetClient(server.grpc_url) as client:
        # Never started (as after Triton's idle release): the client re-STARTs it with CONTEXT.
        outcome = await client.verify(1000, [5], [-1], context=[1, 2])
        assert outcome.accepted_tokens == [5, 2]
        await client.end(1000)


@pytest.mark.slow
async def test_model_errors_and_deadlines_map_to_status_codes(server: TritonServer) -> None:
    async with TargetClient(server.grpc_url) as client:
        with pytest.raises(TargetInvalidArgument, match="START needs CONTEXT"):
            await client.verify(1001, [1], [-1], start=True)  # rejected by model.py
        with pytest.raises(TargetInvalidArgument, match="2 parents"):
            await client.verify(1001, [1], [-1, 0])  # rejected before sending
        with pytest.raises(TargetError) as raised:  # the echo model answers a SLOW_TOKEN context after 0.5 s
            await client.verify(1002, [], [], context=[ECHO_SLOW_TOKEN], start=True, timeout_s=0.05)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await client.end(1001)  # the failed START still opened Triton's sequence slot
        await client.end(1002)


@pytest.mark.slow
async def test_request_after_stop_is_unavailable(tmp_path: Path) -> None:
    server = TritonServer(echo_repository(tmp_path)).start()
    async with TargetClient(server.grpc_url, timeout_s=2.0) as client:
        await client.verify(1, [], [], context=[1], start=True, end=True)
        assert server.stop() == 0
        assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # Python-backend regions released
        assert not await client.ready()
        with pytest.raises(TargetUnavailable) as raised:
            await client.verify(1, [1], [-1])
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.grpc_url in str(raised.value)


@pytest.mark.slow
def test_cli_serves_until_interrupted(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "target_service.launch", "--model-repository", str(echo_repository(tmp_path))]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--exit-timeout", "5"]
    log_path = tmp_path / "cli.log"  # a file, not a pipe: an unread pipe would fill and block the CLI
    with log_path.open("w") as log_file:
        cli = subprocess.Popen(cmd, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Triton ready" not in log_path.read_text():
            time.sleep(0.2)
        assert "Triton ready" in log_path.read_text(), log_path.read_text()[-3000:]
        cli.send_signal(signal.SIGINT)  # forwarded to Triton, which drains and exits
        assert cli.wait(timeout=90) == 0  # generous: CI machines are small and busy
    finally:
        if cli.poll() is None:
            cli.terminate()  # the launcher forwards it; Triton also dies with its parent
            cli.wait(timeout=30)
