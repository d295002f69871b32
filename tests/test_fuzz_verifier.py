"""Fuzzing the verifier's tensors (issue #9 item 4): hostile trees, contexts, parameters and sequence ids.

In process: every request of a fuzzed batch gets a result or a VerifyError with a gRPC status name, the
batch never raises, no cache row is lost, and a witness sequence verified in the same batches gives
exactly what a verifier that never saw the fuzz gives. Then raw tensors of wrong dtypes and shapes through
the real Triton: an INVALID_ARGUMENT-class status each, Triton alive, and its witness still plain greedy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from harness.stack import LocalStack, StackConfig
from specrec.decoding.plain import decode
from specrec.drafting.random_tree import random_tree
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import EOS
from specrec.verify import AcceptParams, TargetVerifier, VerifyError, VerifyRequest
from specrec.verify.rules import MODES
from tests.fuzzing import FUZZ, campaign, examples

EXAMPLES_IN_PROCESS = examples(150)
EXAMPLES_TRITON = examples(40)
CODES = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}  # what model.py turns into INVALID_ARG / UNAVAILABLE
WITNESS = 4242
POOL = [1, 2, 3, 4, 5, 6, 7]  # fuzzed sequence ids come mostly from here, so they collide and reuse state
I64 = st.integers(-2**63, 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@dataclass
class Witness:
    """A live sequence stepped in every fuzzed batch, on the fuzzed verifier and on a clean one."""

    fuzzed: TargetVerifier
    clean: TargetVerifier
    constraint: ListConstraint
    prompts: list[list[int]]
    user: int = 0
    state: ListState | None = None
    lists_done: int = 0
    steps: list[int] = field(default_factory=list)

    def request(self, rng: np.random.Generator, n_nodes: int) -> VerifyRequest:
        # every other list samples: its seeded generator must not be touched by anyone else's requests
        params = AcceptParams(mode="stochastic" if self.user % 2 else "greedy", temperature=0.8)
        if self.state is None:  # (re)start on the next prompt
            prompt = self.prompts[self.user % len(self.prompts)]
            self.state = self.constraint.start(prompt)
            tokens, parents = random_tree(self.constraint, self.state, rng, n_nodes)
            return VerifyRequest(WITNESS, tokens, parents, context=prompt, start=True, params=params, seed=self.user)
        tokens, parents = random_tree(self.constraint, self.state, rng, n_nodes)
        return VerifyRequest(WITNESS, tokens, parents, params=params)

    def check(self, req: VerifyRequest, got: object) -> None:
        want = self.clean.verify_batch([req])[0]
        assert isinstance(want, type(got)) and not isinstance(got, VerifyError), (got, want)
        assert (got.accepted_tokens, got.accepted_nodes, got.done) == (  # type: ignore[attr-defined]
            want.accepted_tokens, want.accepted_nodes, want.done)
        for tok in got.accepted_tokens:  # type: ignore[attr-defined]
            self.state = self.constraint.advance(self.state, tok)  # type: ignore[arg-type]
        self.steps.append(len(got.accepted_tokens))  # type: ignore[attr-defined]
        if got.done:  # type: ignore[attr-defined]
            for v in (self.fuzzed, self.clean):
                v.end(WITNESS)
            self.state, self.user, self.lists_done = None, self.user + 1, self.lists_done + 1


@pytest.fixture(scope="module")
def contexts(tiny_artifacts, tiny_target) -> dict[str, list[int]]:
    """Valid, finished, over-long and broken contexts to draw from."""
    prompt = tiny_artifacts.prompt(3)
    finished = prompt + decode(tiny_target, tiny_artifacts.constraint(), [prompt])[0].tokens
    assert finished[-1] == EOS
    body = prompt[1:-1]
    return {"prompt": prompt, "finished": finished, "long": prompt[:1] + body * 8 + prompt[-1:],
            "no_rec": prompt[:-1], "empty": []}


@pytest.fixture(scope="module")
def witness(tiny_artifacts) -> Witness:
    kw = dict(max_sequences=6, max_len=512)
    return Witness(TargetVerifier(tiny_artifacts.directory, **kw), TargetVerifier(tiny_artifacts.directory, **kw),
                   tiny_artifacts.constraint(), [tiny_artifacts.prompt(u) for u in range(8)])


@st.composite
def trees(draw: st.DrawFn, vocab: int) -> tuple[list[int], list[int]]:
    n = draw(st.one_of(st.integers(0, 10), st.sampled_from([127, 128, 129, 300])))
    token = draw(st.sampled_from([st.integers(0, vocab - 1), st.integers(-5, vocab + 5), I64]))
    tokens = [draw(token) for _ in range(n)] if n <= 10 else [int(t) for t in np.arange(n) % vocab]
    kind = draw(st.sampled_from(["proper", "cycle", "random", "short", "long"]))
    if kind == "proper":
        parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    elif kind == "cycle":  # a node that is its own or a later node's child
        parents = [draw(st.integers(i, n)) for i in range(n)]
    elif kind == "random":
        parents = [draw(st.one_of(st.integers(-3, n + 2), I64)) for _ in range(n)]
    else:
        parents = list(range(-1, n - 2)) if kind == "short" else list(range(-1, n))
    return tokens, parents


item_lists = st.one_of(st.just([]), st.lists(st.integers(-3, 2000), max_size=40), st.lists(I64, max_size=3))


@st.composite
def fuzz_requests(draw: st.DrawFn, vocab: int, contexts: dict[str, list[int]]) -> VerifyRequest:
    tokens, parents = draw(trees(vocab))
    ctx_kind = draw(st.sampled_from(["none", "random", *contexts]))
    context = None if ctx_kind == "none" else (
        draw(st.lists(st.one_of(st.integers(0, vocab + 2), I64), max_size=20)) if ctx_kind == "random"
        else list(contexts[ctx_kind]))
    probs = None
    probs_kind = draw(st.sampled_from(["none", "none", "uniform", "nan", "negative", "unnormalised", "shape"]))
    if probs_kind != "none":
        rows = len(tokens) + 1 if probs_kind != "shape" else draw(st.integers(0, 4))
        probs = torch.full((rows, vocab), 1.0 / vocab)
        if probs_kind in ("nan", "negative", "unnormalised") and rows:
            probs[draw(st.integers(0, rows - 1)), draw(st.integers(0, vocab - 1))] = {
                "nan": math.nan, "negative": -0.5, "unnormalised": 7.0}[probs_kind]
    params = AcceptParams(mode=draw(st.sampled_from([*MODES, "", "GREEDY", "fuzzy"])),
                          temperature=draw(st.one_of(st.just(1.0), FLOATS)),
                          relaxed_top_k=draw(st.one_of(st.just(2), st.integers(-3, 100), I64)),
                          relaxed_min_prob=draw(st.one_of(st.just(0.1), FLOATS)))
    return VerifyRequest(sequence_id=draw(st.one_of(st.sampled_from(POOL), st.integers(-1, 2**64 - 1)).filter(
                             lambda s: s != WITNESS)),
                         tree_tokens=tokens, tree_parents=parents, context=context, start=draw(st.booleans()),
                         end=draw(st.booleans()), params=params,
                         seed=draw(st.one_of(st.integers(0, 9), st.integers(-2**70, 2**70))),
                         n_items=draw(st.one_of(st.integers(1, 12), st.integers(-5, 300))),
                         exclude_history=draw(st.booleans()), draft_probs=probs,
                         banned=draw(item_lists), allowed=draw(item_lists))


def test_fuzzed_batches_never_raise_and_leave_a_live_sequence_alone(witness, contexts):
    verifier = witness.fuzzed
    vocab = verifier.vocab_size
    sizes: list[int] = []
    counts: Counter[str] = Counter()

    @settings(FUZZ, max_examples=EXAMPLES_IN_PROCESS)
    @given(st.lists(fuzz_requests(vocab, contexts), min_size=1, max_size=4), st.integers(0, 4),
           st.integers(0, 2**32 - 1), st.integers(0, 12))
    def run(fuzz: list[VerifyRequest], at: int, seed: int, n_nodes: int) -> None:
        sizes.append(len(fuzz))
        counts["verifier batches"] += 1
        mine = witness.request(np.random.default_rng(seed), n_nodes)
        batch = fuzz[:at] + [mine] + fuzz[at:]
        results = verifier.verify_batch(batch)  # never raises
        assert len(results) == len(batch)
        for req, res in zip(batch, results, strict=True):
            if isinstance(res, VerifyError):
                assert res.code in CODES and str(res), (req, res)
        witness.check(mine, results[batch.index(mine)])
        # no cache row leaks: every row is either free or held by a live sequence
        assert len(verifier.free_rows) + verifier.live_sequences == verifier.cache.n_rows
        assert len(set(verifier.free_rows)) == len(verifier.free_rows)

    campaign(run, counts, ["verifier batches"])
    print(f"\nverifier fuzz: {len(sizes)} batches, {sum(sizes)} fuzzed requests, "
          f"witness {len(witness.steps)} steps / {witness.lists_done} whole lists")
    assert witness.lists_done >= 2, "the witness finished no greedy and sampled list: the check compared too little"


# -- the real Triton -----------------------------------------------------------------------------------

DTYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_,
          "BYTES": np.object_}
TRITON_OK = {"StatusCode.INVALID_ARGUMENT", "StatusCode.UNAVAILABLE"}  # UNAVAILABLE only "RESOURCE_EXHAUSTED: ..."


@pytest.fixture(scope="module")
def triton(tiny_artifacts):
    stack = LocalStack(StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False))
    try:
        stack.start_target()
        yield stack
    finally:
        stack.stop()


MUTATIONS = ["dtype", "shape", "drop", "batch2", "probs", "values", "empty_tree", "filters"]


@st.composite
def raw_requests(draw: st.DrawFn, vocab: int, prompt: list[int]) -> tuple[list[grpcclient.InferInput], bool]:
    """A valid START request (context, a small tree) with 0-3 mutations, so most reach the model."""
    n = draw(st.integers(0, 5))
    arrays = {"CONTEXT": np.asarray(prompt, dtype=np.int64),
              "TREE_TOKENS": np.asarray(draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))),
              "TREE_PARENTS": np.asarray([draw(st.integers(-1, i - 1)) for i in range(n)], dtype=np.int64)}
    dtypes = {"CONTEXT": "INT64", "TREE_TOKENS": "INT64", "TREE_PARENTS": "INT64"}
    batch, start = 1, draw(st.sampled_from([True, True, False]))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        name = draw(st.sampled_from(sorted(arrays)))
        if mutation == "dtype":
            dtypes[name] = draw(st.sampled_from(sorted(DTYPES)))
        elif mutation == "shape":
            arrays[name] = arrays[name].reshape(draw(st.sampled_from([(-1,), (-1, 1), (1, 1, -1)])))
        elif mutation == "drop":
            arrays.pop(name)
        elif mutation == "batch2":  # every input with two rows: one request carrying two trees
            batch = 2
        elif mutation == "probs":
            rows = draw(st.integers(0, n + 2))
            arrays["DRAFT_PROBS"] = np.asarray(draw(st.lists(FLOATS, min_size=rows * vocab, max_size=rows * vocab)))
            dtypes["DRAFT_PROBS"] = "FP32"
        elif mutation == "filters":  # the request's filters: item indices, in range or not
            for filter_input in draw(st.sets(st.sampled_from(["BANNED_ITEMS", "ALLOWED_ITEMS"]), min_size=1)):
                arrays[filter_input] = np.asarray(draw(item_lists), dtype=np.int64)
                dtypes[filter_input] = "INT64"
        elif mutation == "values":
            arrays[name] = np.asarray(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=8)), dtype=np.int64)
        else:
            arrays["TREE_TOKENS"], arrays["TREE_PARENTS"] = np.zeros(0, np.int64), np.zeros(0, np.int64)
    inputs = []
    for name, values in arrays.items():
        values = np.tile(values.reshape(1, -1), (batch, 1)) if values.ndim == 1 else values
        if dtypes[name] == "BYTES":
            values = np.asarray([str(v).encode() for v in values.reshape(-1)], dtype=np.object_).reshape(values.shape)
        else:
            values = values.astype(DTYPES[dtypes[name]])
        tensor = grpcclient.InferInput(name, list(values.shape), dtypes[name])
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs, start


def test_raw_triton_tensors_get_invalid_argument_and_triton_lives(triton, tiny_artifacts, tiny_target):
    constraint = tiny_artifacts.constraint()
    prompt = tiny_artifacts.prompt(5)
    reference = decode(tiny_target, constraint, [prompt])[0].tokens
    client = grpcclient.InferenceServerClient(triton.target_addr)
    vocab = tiny_artifacts.sids.vocab.size
    committed: list[int] = []  # the witness's list so far; it restarts on the same prompt when done
    lists_done = 0

    def witness_step() -> None:
        nonlocal lists_done
        start = not committed
        inputs = [_int64("TREE_TOKENS", []), _int64("TREE_PARENTS", [])]
        if start:
            inputs.append(_int64("CONTEXT", prompt))
        res = client.infer("specrec_target", inputs, sequence_id=WITNESS, sequence_start=start,
                           parameters={"n_items": constraint.n_items} if start else None, client_timeout=30)
        committed.extend(res.as_numpy("ACCEPTED_TOKENS").reshape(-1).tolist())
        if committed[-1] == EOS:
            assert committed == reference, "the witness sequence's list changed beside the fuzz"
            lists_done += 1
            committed.clear()
            _end(client, WITNESS)

    witness_step()
    codes: list[str] = []
    messages: set[str] = set()

    @settings(FUZZ, max_examples=EXAMPLES_TRITON)
    @given(raw_requests(vocab, prompt), st.one_of(st.sampled_from(POOL), st.integers(0, 2**63 - 1),
                                                 st.text(max_size=8)),
           st.booleans(),
           st.dictionaries(st.sampled_from(["mode", "temperature", "seed", "n_items", "relaxed_top_k",
                                            "relaxed_min_prob", "exclude_history", "junk"]),
                           st.one_of(st.text(max_size=6), st.integers(-2**63, 2**63 - 1), st.booleans(),
                                     st.sampled_from(["nan", "inf", "-1", "1e400", "greedy", "stochastic"]))))
    def run(request, sequence_id, end, params) -> None:
        inputs, start = request
        if sequence_id == WITNESS:
            sequence_id = WITNESS + 1
        try:
            client.infer("specrec_target", inputs, sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                         parameters=params or None, client_timeout=30)
            codes.append("OK")
        except InferenceServerException as e:
            assert e.status() in TRITON_OK, (e.status(), e.message())
            if e.status() == "StatusCode.UNAVAILABLE":
                assert "RESOURCE_EXHAUSTED" in (e.message() or ""), e.message()
            assert e.message(), "an error without a message"
            codes.append(e.status())
            messages.add(e.message()[:90])
        if not end:  # as the orchestrator does on every exit: END frees Triton's slot (64 per instance)
            _end(client, sequence_id)
        counts["Triton ModelInfer (raw tensors)"] += 1
        witness_step()

    counts: Counter[str] = Counter()
    try:
        campaign(run, counts, ["Triton ModelInfer (raw tensors)"])
        while committed:
            witness_step()
    finally:
        for sid in [*POOL, WITNESS]:  # Triton's shutdown waits for open sequences
            _end(client, sid)
    print(f"\ntriton fuzz: {len(codes)} infer calls, witness {lists_done} whole lists: "
          + ", ".join(f"{c} x{codes.count(c)}" for c in sorted(set(codes))))
    print("\n".join(sorted(messages)))
    assert client.is_server_live() and client.is_model_ready("specrec_target")
    assert lists_done >= 1, "the witness finished no list beside the fuzz"


def _end(client: grpcclient.InferenceServerClient, sequence_id: int | str) -> None:
    try:
        client.infer("specrec_target", [_int64("TREE_TOKENS", []), _int64("TREE_PARENTS", [])],
                     sequence_id=sequence_id, sequence_end=True, client_timeout=10)
    except InferenceServerException:
        pass


def _int64(name: str, values: list[int]) -> grpcclient.InferInput:
    arr = np.asarray(values, dtype=np.int64).reshape(1, -1)
    tensor = grpcclient.InferInput(name, list(arr.shape), "INT64")
    tensor.set_data_from_numpy(arr)
    return tensor


def test_a_malformed_end_still_frees_its_sequence(triton, tiny_artifacts):
    """An END whose payload is refused (INVALID_ARGUMENT, a message without a stack trace) still ends the sequence:
    otherwise its state and its batcher slot would live until the idle timeout."""
    client = grpcclient.InferenceServerClient(triton.target_addr)
    prompt, n_items = tiny_artifacts.prompt(6), tiny_artifacts.constraint().n_items
    empty = [_int64("TREE_TOKENS", []), _int64("TREE_PARENTS", [])]

    def live(sid: int, start: bool = False) -> int:
        res = client.infer("specrec_target", empty + ([_int64("CONTEXT", prompt)] if start else []), sequence_id=sid,
                           sequence_start=start, parameters={"n_items": n_items} if start else None, client_timeout=30)
        return int(res.as_numpy("LIVE_SEQUENCES").reshape(-1)[0])

    try:
        base = live(9101, start=True)
        assert live(9102, start=True) == base + 1
        with pytest.raises(InferenceServerException) as err:
            client.infer("specrec_target", empty, sequence_id=9102, sequence_end=True, parameters={"seed": "abc"},
                         client_timeout=30)
        assert "seed" in err.value.message() and "Traceback" not in err.value.message(), err.value.message()
        assert live(9101) == base  # 9102 is gone
    finally:
        for sid in (9101, 9102):
            _end(client, sid)
