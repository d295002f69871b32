"""A drafter that answers slowly or with malformed trees: detected and bypassed, every list unchanged.

The drafter here is a FAULT INJECTOR, not the real draft service: a real gRPC server implementing
DraftService (protos/specrec/v1/draft.proto) in this test process, answering Open normally and every
Advance with the fault under test. Real Triton and a real orchestrator process sit behind it. In mode
`late_real` it drafts with the library's model drafter session and checks every commit as the draft service does.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from draft_service.server import _advance, to_budget
from harness.loadgen import Tally, run_requests_sync
from harness.stack import StackConfig, free_port
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc, tree_pb2
from specrec.drafting.base import DraftError
from specrec.drafting.model_drafter import ModelDrafter, load_model_drafter
from specrec.model_identity import artifact_version
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.trie import ItemTrie
from specrec.semantic_ids.vocab import BOS
from tests.chaos.conftest import TIMEOUT_S, ChaosStack, record, requests_for

pytestmark = pytest.mark.slow
DRAFT_TIMEOUT_MS = 300
SLOW_S = 1.0  # past the orchestrator's per-tree deadline
LATE_S = DRAFT_TIMEOUT_MS / 1000 + 0.05  # just past it: the late tree comes while the request still runs


class FaultInjector(draft_pb2_grpc.DraftServiceServicer):
    """Answers every Advance with the current `mode`'s fault; counts what it injected."""

    def __init__(self, vocab_size: int, model_version: str):
        self.model_version = model_version  # it claims the real artifacts' version, or the orchestrator skips it
        self.vocab_size = vocab_size
        self.mode = "slow"
        self.injected: Counter = Counter()
        self.advances_after_late = 0  # late_once: Advance messages a stream sent after its late tree
        self.drafter: ModelDrafter | None = None  # late_real: the library's drafter, and the trie its lists follow
        self.trie: ItemTrie | None = None
        self.refused_commits: list[str] = []  # late_real: commits the draft service would refuse

    def tree(self) -> tree_pb2.TokenTree:
        mode, v = self.mode, self.vocab_size
        if mode == "bad_parents":  # a node pointing at itself, one at a later node
            return tree_pb2.TokenTree(tokens=[5, 6, 7], parents=[-1, 1, 5])
        if mode == "unknown_tokens":
            return tree_pb2.TokenTree(tokens=[v + 7, -2], parents=[-1, 0])
        if mode == "length_mismatch":
            return tree_pb2.TokenTree(tokens=[5, 6, 7], parents=[-1])
        if mode == "oversized":
            return tree_pb2.TokenTree(tokens=[5] * 300, parents=[-1] * 300)
        if mode == "illegal_tokens":  # in the vocabulary, but the list grammar never allows them here
            return tree_pb2.TokenTree(tokens=[BOS, BOS, BOS], parents=[-1, 0, 1])
        return tree_pb2.TokenTree()

    def Speculate(self, request_iterator, context):
        if self.mode == "late_real":
            yield from self._late_real(request_iterator, context)
            return
        late_sent = False
        for request in request_iterator:
            if request.WhichOneof("kind") == "open":
                yield draft_pb2.SpeculateResponse(tree=tree_pb2.TokenTree())
                continue
            if self.mode == "late_once":  # one tree past the deadline, then prompt answers on the same stream
                self.advances_after_late += late_sent
                if not late_sent:
                    self.injected[self.mode] += 1
                    late_sent = True
                    time.sleep(LATE_S)
                yield draft_pb2.SpeculateResponse(tree=tree_pb2.TokenTree())
                continue
            self.injected[self.mode] += 1
            if self.mode == "slow":
                time.sleep(SLOW_S)
                yield draft_pb2.SpeculateResponse(tree=tree_pb2.TokenTree())
            elif self.mode == "stream_error":
                context.abort(grpc.StatusCode.INTERNAL, "injected fault")
            else:
                yield draft_pb2.SpeculateResponse(tree=self.tree())

    def Stats(self, request, context):
        return draft_pb2.StatsResponse(model_version=self.model_version)

    def _late_real(self, request_iterator, context):
        """Real trees from a real drafting session, the second tree of every stream past the deadline; each Advance
        goes through the draft service's own handling, so a commit it would refuse is refused (INVALID_ARGUMENT)."""
        assert self.drafter is not None and self.trie is not None
        session, late_sent = None, False
        for request in request_iterator:
            if request.WhichOneof("kind") == "open":
                o = request.open
                constraint = ListConstraint(self.trie, o.n_items, o.exclude_history, o.banned_items, o.allowed_items)
                session = self.drafter.open(list(o.context), constraint)
                yield draft_pb2.SpeculateResponse(tree=session.draft(to_budget(o.budget)).to_proto())
                continue
            advance = request.advance
            try:  # what the draft service runs for an Advance: the commit checked, then the next tree
                tree = _advance(session, list(advance.committed), list(advance.then_plain), to_budget(advance.budget),
                                False)
            except DraftError as e:
                self.refused_commits.append(str(e))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            self.advances_after_late += late_sent
            if not late_sent:
                self.injected[self.mode] += 1
                late_sent = True
                time.sleep(LATE_S)
            yield draft_pb2.SpeculateResponse(tree=tree.to_proto())


@pytest.fixture(scope="module")
def injector_stack(tiny_artifacts):
    injector = FaultInjector(tiny_artifacts.sids.vocab.size,
                             artifact_version(Path(tiny_artifacts.directory).resolve()))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    draft_pb2_grpc.add_DraftServiceServicer_to_server(injector, server)
    addr = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(addr)
    server.start()
    config = StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="fixed:3:16",
                         extra_env={"SPECREC_DRAFT_TIMEOUT_MS": str(DRAFT_TIMEOUT_MS)})
    try:
        with ChaosStack(config, draft_addr=addr) as stack:
            yield stack, injector
    finally:
        server.stop(grace=0)


MODES = ["slow", "bad_parents", "unknown_tokens", "length_mismatch", "oversized", "illegal_tokens", "stream_error"]


@pytest.mark.parametrize("mode", MODES)
def test_faulty_drafter_is_bypassed(injector_stack, tiny_artifacts, reference, mode):
    stack, injector = injector_stack
    injector.mode = mode
    stack.restart_orchestrator()  # a fresh orchestrator: no backoff left over from the previous fault
    users = list(reference)[:12]
    outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, users), 4, TIMEOUT_S)
    tally = Tally.of(outcomes, reference)
    record(f"drafter fault injector: {mode} ({len(users)} requests, 4 at a time)", tally,
           injected=injector.injected[mode])
    assert injector.injected[mode] > 0, "the orchestrator never asked the faulty drafter: nothing was tested"
    assert tally.completed == tally.sent, tally.summary()  # a bad drafter costs speed, never a request


def test_a_late_tree_is_skipped_and_the_stream_goes_on(injector_stack, tiny_artifacts, reference):
    """One tree past the per-tree deadline: that round runs without a tree, the request keeps its drafter (the same
    stream is asked again, the late tree read and dropped first), and every list is unchanged."""
    stack, injector = injector_stack
    injector.mode = "late_once"
    stack.restart_orchestrator()
    users = list(reference)[:8]
    outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, users), 4, TIMEOUT_S)
    tally = Tally.of(outcomes, reference)
    record(f"drafter late once per stream ({len(users)} requests)", tally, injected=injector.injected["late_once"],
           advances_after_late=injector.advances_after_late)
    assert injector.injected["late_once"] > 0, "no tree was late: nothing was tested"
    assert tally.completed == tally.sent, tally.summary()
    assert injector.advances_after_late > 0, "every stream was dropped after its late tree"


def test_after_a_late_tree_the_next_commit_is_one_the_drafter_accepts(injector_stack, tiny_artifacts, tiny_drafter,
                                                                       reference):
    """A late tree was drafted from the commit its request carried, so the next request must not carry that commit
    again: the rounds since then ran without a tree and commit as such. (Sending it twice made the real draft service
    refuse the stream, and the pod back off for every request, after each late tree.)"""
    stack, injector = injector_stack
    injector.mode = "late_real"
    injector.drafter = load_model_drafter(Path(tiny_artifacts.directory))
    injector.trie = ItemTrie(tiny_artifacts.sids)
    injector.advances_after_late = 0
    stack.restart_orchestrator()
    users = list(reference)[:8]
    outcomes = run_requests_sync(stack.orchestrator_addr, requests_for(tiny_artifacts, users), 2, TIMEOUT_S)
    tally = Tally.of(outcomes, reference)
    record(f"real drafting session, late once per stream ({len(users)} requests)", tally,
           injected=injector.injected["late_real"], refused=len(injector.refused_commits))
    assert injector.injected["late_real"] > 0, "no tree was late: nothing was tested"
    assert tally.completed == tally.sent, tally.summary()
    assert injector.refused_commits == [], injector.refused_commits[:2]
    assert injector.advances_after_late > 0, "no stream drafted again after its late tree"
