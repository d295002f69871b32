"""Overload: past a cap the client gets RESOURCE_EXHAUSTED with a retry hint, never a hang or a wrong list.

Two caps, each provoked for real: the orchestrator's in-flight cap, and the target's live-sequence cap
(a copy of the model repository with room for one sequence and a batcher that waits long enough to put
several new sequences into one forward pass, so all but one are refused).
"""

from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from harness.loadgen import Tally, run_requests_sync
from harness.stack import StackConfig, free_port
from specrec.target_client import TargetOverloaded, map_error
from tests.chaos.conftest import TIMEOUT_S, ChaosStack, model_repository, record, requests_for
from tests.test_monitoring import sample, scrape

pytestmark = pytest.mark.slow


def check_overloaded(outcomes, reference) -> Tally:
    tally = Tally.of(outcomes, reference)
    refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    assert tally.lost == 0, tally.summary()
    assert refused, f"nothing was refused past the cap: {tally.summary()}"
    assert tally.completed + len(refused) == tally.sent, tally.summary()
    assert all(o.retry_after_ms and int(o.retry_after_ms) > 0 for o in refused), "a refusal without a retry hint"
    assert all("retry" in o.details for o in refused), refused[0].details
    return tally


def test_in_flight_cap_refuses_with_a_retry_hint(tiny_artifacts, reference):
    config = StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="off",
                         extra_env={"SPECREC_MAX_IN_FLIGHT": "2"}, metrics_port=free_port())
    with ChaosStack(config) as stack:
        outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, reference), 12, TIMEOUT_S)
        metrics = scrape(stack.metrics_urls()["orchestrator"])
    tally = check_overloaded(outcomes, reference)
    record("overload: orchestrator in-flight cap 2, 24 requests 12 at a time", tally)
    # What an SRE sees: every refusal and every completion counted by status code.
    refused = sum(o.code == "RESOURCE_EXHAUSTED" for o in outcomes)
    assert sample(metrics, "specrec_requests_total", method="Recommend", code="RESOURCE_EXHAUSTED") == refused
    assert sample(metrics, "specrec_requests_total", method="Recommend", code="OK") == tally.completed


@pytest.fixture(scope="module")
def one_sequence_target(tiny_artifacts, tmp_path_factory):
    repo = model_repository(tmp_path_factory.mktemp("repo"), max_sequences=1, max_candidate_sequences=16,
                            preferred_batch_size=[8], max_queue_delay_microseconds=300_000)
    config = StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="off")
    with ChaosStack(config, model_repository=repo) as stack:
        yield stack


def test_target_at_capacity_is_resource_exhausted_not_unavailable(one_sequence_target, tiny_artifacts, reference):
    stack = one_sequence_target
    outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, list(reference)[:8]), 8,
                                 TIMEOUT_S)
    tally = check_overloaded(outcomes, reference)
    assert all("at capacity" in o.details for o in outcomes if o.code == "RESOURCE_EXHAUSTED")
    record("overload: target live-sequence cap 1, 8 requests at once", tally)


def test_queue_full_maps_to_overloaded():
    # Triton's own "exceeds maximum queue size" cannot be provoked here: the sequence batcher's oldest
    # strategy has no max_queue_size / queue policy in Triton 2.51 (StrategyOldest holds only
    # max_candidate_sequences, preferred_batch_size, max_queue_delay_microseconds, preserve_ordering;
    # triton-inference-server/server#5467). A dynamic-batched model would send exactly this error.
    exc = InferenceServerException("inference request exceeds maximum queue size for model 'm'",
                                   "StatusCode.UNAVAILABLE")
    error = map_error(exc, "host:1", 7)
    assert isinstance(error, TargetOverloaded)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after_ms > 0
