"""The verifier library without Triton: lossless greedy trees, state handling and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from specrec.decoding.plain import decode
from specrec.drafting.random_tree import random_tree
from specrec.training.examples import encode_prompt
from specrec.verify import AcceptParams, TargetVerifier, VerifyError, VerifyRequest

N_USERS = 12


@pytest.fixture(scope="module")
def verifier(tiny_artifacts):
    return TargetVerifier(tiny_artifacts.directory, max_sequences=16)


def run_until_done(verifier, constraint, prompt_by_seq, rng, n_nodes=12, truth_by_seq=None):
    out = {s: [] for s in prompt_by_seq}
    states = {s: constraint.start(p) for s, p in prompt_by_seq.items()}
    reqs = {s: VerifyRequest(s, [], [], context=p, start=True) for s, p in prompt_by_seq.items()}
    while reqs:
        order = list(reqs)
        results = verifier.verify_batch([reqs[s] for s in order])
        reqs = {}
        for s, res in zip(order, results, strict=True):
            assert not isinstance(res, VerifyError), res
            for tok in res.accepted_tokens:
                states[s] = constraint.advance(states[s], tok)
                assert states[s] is not None, "the verifier committed a token the grammar forbids"
            out[s] += res.accepted_tokens
            if res.done:
                verifier.end(s)
                continue
            truth = truth_by_seq[s][len(out[s]):] if truth_by_seq else None
            tokens, parents = random_tree(constraint, states[s], rng, n_nodes, truth)
            reqs[s] = VerifyRequest(s, tokens, parents)
    return out


def test_greedy_tree_verification_equals_plain_greedy(tiny_artifacts, tiny_target, verifier):
    constraint = tiny_artifacts.constraint()
    prompts = {100 + u: tiny_artifacts.prompt(u) for u in range(N_USERS)}
    reference = {s: d.tokens for s, d in zip(prompts, decode(tiny_target, constraint, list(prompts.values())),
                                             strict=True)}
    rng = np.random.default_rng(0)
    got = run_until_done(verifier, constraint, prompts, rng, truth_by_seq=reference)
    assert got == reference
    assert verifier.live_sequences == 0


def test_random_trees_without_hints_are_still_lossless(tiny_artifacts, tiny_target, verifier):
    constraint = tiny_artifacts.constraint()
    prompts = {200 + u: tiny_artifacts.prompt(u) for u in range(N_USERS, N_USERS + 4)}
    reference = [d.tokens for d in decode(tiny_target, constraint, list(prompts.values()))]
    got = run_until_done(verifier, constraint, prompts, np.random.default_rng(1), n_nodes=5)
    assert list(got.values()) == reference


def test_bad_requests_are_refused_and_leave_state_alone(tiny_artifacts, verifier):
    prompt = tiny_artifacts.prompt(0)
    ok = verifier.verify_batch([VerifyRequest(7, [], [], context=prompt, start=True)])[0]
    assert not isinstance(ok, VerifyError)
    committed = list(verifier.sequences[7].committed)
    vocab = verifier.vocab_size
    bad = [
        VerifyRequest(7, [5, 6], [-1]),  # mismatched lengths
        VerifyRequest(7, [5, 6], [-1, 1]),  # parent not earlier
        VerifyRequest(7, [vocab + 3], [-1]),  # outside the vocabulary
        VerifyRequest(7, [5], [-1], params=AcceptParams(mode="fuzzy")),
        VerifyRequest(999, [5], [-1]),  # unknown sequence without CONTEXT
        VerifyRequest(8, [], [], context=[1, 2, 3], start=True),  # context that breaks the grammar
    ]
    good = VerifyRequest(9, [], [], context=prompt, start=True)
    results = verifier.verify_batch(bad + [good])
    for req, res in zip(bad, results, strict=False):
        assert isinstance(res, VerifyError) and res.code == "INVALID_ARGUMENT", (req, res)
    assert "send CONTEXT" in str(results[4])
    assert not isinstance(results[-1], VerifyError), "a good request in the same batch is unaffected"
    assert verifier.sequences[7].committed == committed
    verifier.end(7)
    verifier.end(9)
    assert 8 not in verifier.sequences


def test_lost_state_is_rebuilt_from_context(tiny_artifacts, tiny_target, verifier):
    constraint = tiny_artifacts.constraint()
    prompt = tiny_artifacts.prompt(3)
    reference = decode(tiny_target, constraint, [prompt])[0].tokens
    first = verifier.verify_batch([VerifyRequest(11, [], [], context=prompt, start=True)])[0]
    verifier.end(11)  # as if evicted
    committed = prompt + first.accepted_tokens
    res = verifier.verify_batch([VerifyRequest(11, [], [], context=committed)])[0]
    assert first.accepted_tokens + res.accepted_tokens == reference[:2]
    verifier.end(11)


def test_cap_evicts_idle_sequences_and_refuses_when_all_are_busy(tiny_artifacts):
    small = TargetVerifier(tiny_artifacts.directory, max_sequences=2)
    prompt = tiny_artifacts.prompt(0)
    for s in (1, 2):
        small.verify_batch([VerifyRequest(s, [], [], context=prompt, start=True)])
    small.verify_batch([VerifyRequest(3, [], [], context=prompt, start=True)])  # evicts 1, the LRU
    assert set(small.sequences) == {2, 3}
    res = small.verify_batch([VerifyRequest(s, [], [], context=prompt, start=True) for s in (4, 5, 6)])
    assert sum(isinstance(r, VerifyError) and r.code == "RESOURCE_EXHAUSTED" for r in res) == 1
    small.expire_idle(now=1e12)
    assert small.live_sequences == 0


def test_a_sequence_near_the_limit_batched_with_a_large_tree_answers_both(tiny_artifacts, tiny_target):
    """Rows are padded to the batch's largest block: a row near the position limit must not overflow because another
    row carries a big tree (the whole batch used to fail). Both answers equal verifying each sequence alone."""
    constraint = tiny_artifacts.constraint()
    limit = 512
    train = tiny_artifacts.split.train
    user = max(range(len(train)), key=lambda u: len(train[u]))
    items = list(train[user])
    while len(encode_prompt(tiny_artifacts.sids, items)) > limit - 20:
        items = items[1:]
    long_prompt, short_prompt = encode_prompt(tiny_artifacts.sids, items), tiny_artifacts.prompt(1)

    def rounds(verifier, seqs):
        """START every sequence, then one round: a 2-node tree for the long one, a 32-node tree for the short."""
        starts = verifier.verify_batch([VerifyRequest(s, [], [], context=p, start=True) for s, p in seqs.items()])
        reqs = []
        for (s, p), res in zip(seqs.items(), starts, strict=True):
            assert not isinstance(res, VerifyError), res
            state = constraint.start(p)
            for tok in res.accepted_tokens:
                state = constraint.advance(state, tok)
            tokens, parents = random_tree(constraint, state, np.random.default_rng(s), 2 if s == 1 else 32)
            reqs.append(VerifyRequest(s, tokens, parents))
        return verifier.verify_batch(reqs)

    together = rounds(TargetVerifier(tiny_artifacts.directory, max_sequences=4), {1: long_prompt, 2: short_prompt})
    assert all(not isinstance(r, VerifyError) for r in together), together
    alone = [rounds(TargetVerifier(tiny_artifacts.directory, max_sequences=4), {s: p})[0]
             for s, p in ((1, long_prompt), (2, short_prompt))]
    assert [r.accepted_tokens for r in together] == [r.accepted_tokens for r in alone]
