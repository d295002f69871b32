"""A storm of client cancellations (unary and streaming, at random points): no session leaks on the
drafter or the target, and the stack then serves the reference lists as before."""

from __future__ import annotations

import asyncio
import random

import pytest

from harness.loadgen import Tally, run_requests, run_requests_sync
from harness.stack import StackConfig
from tests.chaos.conftest import TIMEOUT_S, ChaosStack, record, requests_for, wait_for

pytestmark = pytest.mark.slow


def test_cancellation_storm_leaks_no_session(tiny_artifacts, tiny_drafter, reference):
    config = StackConfig(artifacts=tiny_artifacts.directory, policy="fixed:3:16",
                         extra_env={"SPECREC_DRAFT_TIMEOUT_MS": "2000"})
    rng = random.Random(0)
    storm = requests_for(tiny_artifacts, list(reference) * 2)  # 48 per kind
    cancel_at = {i: rng.uniform(0.0, 1.5) for i in range(len(storm))}
    with ChaosStack(config) as stack:

        async def both():
            return await asyncio.gather(
                run_requests(stack.orchestrator_addr, storm, 16, TIMEOUT_S, cancel_after_s=cancel_at),
                run_requests(stack.orchestrator_addr, storm, 16, TIMEOUT_S, stream=True, cancel_after_s=cancel_at))

        unary, streamed = asyncio.run(both())
        tally = Tally.of(unary + streamed, reference)
        settled = wait_for(lambda: stack.live_counts() == (0, 0), 15)
        left = stack.live_counts()
        after = Tally.of(run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, reference), 4,
                                           TIMEOUT_S), reference)
    record("cancellation storm (96 requests, 32 at a time, cancelled at 0-1.5 s)", tally,
           leaked_sessions=left, after=after.summary())
    assert tally.lost == 0 and tally.cancelled > 0, tally.summary()
    assert settled, f"sessions left behind (drafter, target): {left}"
    assert after.completed == after.sent, after.summary()
