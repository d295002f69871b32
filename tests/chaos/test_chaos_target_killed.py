"""kill -9 of Triton's Python backend stub, then of tritonserver itself, while requests run.

In-flight requests either complete with the reference list or fail with UNAVAILABLE; none hangs. Triton
2.51 does not restart a dead stub and stays READY while failing every request, so the launcher's stub
watch kills it and exits; like a supervisor, the test then starts the target again, and new requests
succeed with the reference lists (the orchestrator reconnects by itself).
"""

from __future__ import annotations

import contextlib

import psutil
import pytest

from harness.loadgen import Outcome, Tally, run_requests_sync
from harness.stack import StackConfig
from tests.chaos.conftest import TIMEOUT_S, ChaosStack, record, requests_for, triton_processes, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_artifacts):
    config = StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="off")
    with ChaosStack(config) as running:
        yield running


def run_with_fault(stack, arts, reference, fault, after: int = 6) -> Tally:
    """Run every reference request, 4 at a time; `fault` strikes once `after` of them have completed."""
    done: list[Outcome] = []

    def strike(outcome: Outcome) -> None:
        done.append(outcome)
        if len(done) == after:
            fault()

    outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(arts, reference), 4, TIMEOUT_S,
                                 on_outcome=strike)
    tally = Tally.of(outcomes, reference)
    assert tally.lost == 0, tally.summary()
    assert set(tally.codes) <= {"OK", "UNAVAILABLE"}, tally.summary()
    assert tally.codes["UNAVAILABLE"] > 0, f"the target died mid-run, so some requests must fail: {tally.summary()}"
    return tally


def recovered(stack, arts, reference) -> Tally:
    """Requests succeed again (bounded wait), then a full round of them all equals the reference."""
    probe = requests_for(arts, list(reference)[:1])
    assert wait_for(lambda: run_requests_sync(stack.orchestrator_addr, probe, 1, TIMEOUT_S)[0].code == "OK", 90, 1.0)
    tally = Tally.of(run_requests_sync(stack.orchestrator_addr, requests_for(arts, reference), 4, TIMEOUT_S),
                     reference)
    assert tally.completed == tally.sent, tally.summary()
    return tally


def restart_target(stack) -> None:
    assert wait_for(lambda: not stack.procs["target"].alive(), 60), "the launcher outlived its broken Triton"
    stack.start_target()  # what a supervisor (Kubernetes) does


def test_python_stub_killed_mid_request(stack, tiny_artifacts, reference):
    _, stubs = triton_processes(stack)
    assert stubs, "no triton_python_backend_stub under tritonserver"
    tally = run_with_fault(stack, tiny_artifacts, reference, lambda: [p.kill() for p in stubs])
    restart_target(stack)
    after = recovered(stack, tiny_artifacts, reference)
    record("Triton Python stub kill -9 mid-request, Triton restarted (24 requests, 4 at a time)", tally,
           after=after.summary())


def test_tritonserver_killed_mid_request(stack, tiny_artifacts, reference):
    server, stubs = triton_processes(stack)
    tally = run_with_fault(stack, tiny_artifacts, reference, server.kill)
    restart_target(stack)
    for stub in stubs:  # a stub outliving its server is an orphan we made: do not leave it running
        with contextlib.suppress(psutil.NoSuchProcess):
            stub.kill()
    after = recovered(stack, tiny_artifacts, reference)
    record("tritonserver kill -9 mid-request, then restarted (24 requests, 4 at a time)", tally,
           after=after.summary())
