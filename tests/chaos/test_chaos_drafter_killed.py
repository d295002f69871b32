"""kill -9 of the draft service while requests stream: they finish by plain decoding, lists unchanged."""

from __future__ import annotations

import pytest

from harness.loadgen import Outcome, Tally, run_requests_sync
from harness.stack import StackConfig
from tests.chaos.conftest import TIMEOUT_S, ChaosStack, record, requests_for

pytestmark = pytest.mark.slow


def test_drafter_killed_mid_stream(tiny_artifacts, tiny_drafter, reference):
    config = StackConfig(artifacts=tiny_artifacts.directory, policy="fixed:3:16",
                         extra_env={"SPECREC_DRAFT_TIMEOUT_MS": "2000"})
    with ChaosStack(config) as stack:
        done: list[Outcome] = []

        def strike(outcome: Outcome) -> None:  # kill once 4 streams are done: 4 others are mid-stream
            done.append(outcome)
            if len(done) == 4:
                stack.procs["draft"].kill()

        outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, reference), 4, TIMEOUT_S,
                                     stream=True, on_outcome=strike)
        assert not stack.procs["draft"].alive()
    tally = Tally.of(outcomes, reference)
    record("draft service kill -9 mid-stream (24 streams, 4 at a time)", tally)
    assert tally.completed == tally.sent, tally.summary()  # not one request may fail for a lost drafter
