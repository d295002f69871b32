"""Acceptance modes on the tiny target: stochastic verification samples exactly the target's
distribution (chi-square), relaxed verification obeys DARE's rule, greedy keeps the argmax path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specrec.decoding.select import constrained_probs
from specrec.models.llama import KVCache
from specrec.models.steps import Block, build_step
from specrec.verify import AcceptParams, TargetVerifier, VerifyRequest
from specrec.verify.rules import accept

N_SEEDS = 1500


@pytest.fixture(scope="module")
def verifier(tiny_artifacts):
    return TargetVerifier(tiny_artifacts.directory, max_sequences=4)


def first_token_distribution(verifier, arts, prompt: list[int]) -> dict[int, float]:
    """The target's exact sampling distribution (T = 1) of the first generated token."""
    constraint = arts.constraint()
    state = constraint.start(prompt)
    model = verifier.model
    cache = KVCache(model.args, 1, len(prompt) + 1)
    step = build_step(cache, [Block.chain(0, prompt)])
    with torch.inference_mode():
        logits = model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask)[0, -1]
    probs = constrained_probs(logits, constraint.allowed(state), 1.0)
    return {int(t): float(probs[t]) for t in torch.nonzero(probs > 0).flatten()}


def sample_first_tokens(verifier, prompt, tree_for_seed, mode_params, draft_probs_for_seed=None) -> list[int]:
    firsts = []
    for seed in range(N_SEEDS):
        tokens, parents = tree_for_seed(seed)
        probs = draft_probs_for_seed(seed) if draft_probs_for_seed else None
        res = verifier.verify_batch([VerifyRequest(50, tokens, parents, context=prompt, start=True, seed=seed,
                                                   params=mode_params, draft_probs=probs)])[0]
        firsts.append(res.accepted_tokens[0])
    verifier.end(50)
    return firsts


def assert_matches(samples: list[int], dist: dict[int, float]) -> None:
    """Chi-square goodness of fit, rare tokens pooled so every expected count is >= 5."""
    tokens = sorted(dist, key=lambda t: -dist[t])
    expected, observed, pool_e, pool_o = [], [], 0.0, 0
    counts = {t: samples.count(t) for t in set(samples)}
    assert set(counts) <= set(dist), "sampled a token the target gives zero probability"
    for t in tokens:
        e = dist[t] * len(samples)
        if e >= 5:
            expected.append(e)
            observed.append(counts.get(t, 0))
        else:
            pool_e, pool_o = pool_e + e, pool_o + counts.get(t, 0)
    if pool_e > 0:
        expected.append(pool_e)
        observed.append(pool_o)
    stat = chisquare(observed, np.asarray(expected) * sum(observed) / sum(expected))
    assert stat.pvalue > 0.001, f"sampled distribution differs from the target's (p = {stat.pvalue:.2g})"


def test_stochastic_top_k_tree_samples_the_target_distribution(verifier, tiny_artifacts):
    prompt = tiny_artifacts.prompt(5)
    dist = first_token_distribution(verifier, tiny_artifacts, prompt)
    top = sorted(dist, key=lambda t: -dist[t])[:3]  # distinct top-k children, like EAGLE-2's trees
    samples = sample_first_tokens(verifier, prompt, lambda s: (top, [-1, -1, -1]),
                                  AcceptParams(mode="stochastic", temperature=1.0))
    assert_matches(samples, dist)


def test_stochastic_chain_sampled_from_q_samples_the_target_distribution(verifier, tiny_artifacts):
    prompt = tiny_artifacts.prompt(6)
    dist = first_token_distribution(verifier, tiny_artifacts, prompt)
    vocab = verifier.vocab_size
    allowed = sorted(dist)
    q = torch.zeros(vocab)
    q[allowed] = torch.linspace(1.0, 3.0, len(allowed))  # a drafter that is wrong on purpose
    q /= q.sum()
    rng = np.random.default_rng(0)

    def tree(seed: int):
        return [int(rng.choice(vocab, p=q.numpy() / q.numpy().sum()))], [-1]

    def probs(seed: int):
        return torch.stack([q, torch.zeros(vocab)])

    samples = sample_first_tokens(verifier, prompt, tree, AcceptParams(mode="stochastic"), probs)
    assert_matches(samples, dist)


def test_relaxed_accepts_only_top_k_above_threshold_and_k1_is_greedy():
    logits = torch.log(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.3, 0.15, 0.05]) + 1e-12)
    allowed = [np.arange(5, 9), np.arange(5, 9), np.arange(5, 9)]
    rows = torch.stack([logits, logits, logits])
    # root children: 6 (2nd best, p = 0.3 >= 0.1) and 7 (3rd best); 6 -> 8 (4th best)
    tokens, parents = [6, 7, 8], [-1, -1, 0]
    path, bonus = accept(tokens, parents, rows, [allowed[0], allowed[1], allowed[2], allowed[0]],
                         AcceptParams(mode="relaxed", relaxed_top_k=2, relaxed_min_prob=0.1))
    assert path == [0] and bonus == 5  # 6 accepted (top-2, >= 0.1); 8 is not top-2; bonus = argmax
    path, bonus = accept(tokens, parents, rows, [allowed[0], allowed[1], allowed[2], allowed[0]],
                         AcceptParams(mode="relaxed", relaxed_top_k=1))
    assert path == [] and bonus == 5  # k = 1 is strict greedy
    path, bonus = accept(tokens, parents, rows, [allowed[0], allowed[1], allowed[2], allowed[0]],
                         AcceptParams(mode="relaxed", relaxed_top_k=2, relaxed_min_prob=0.35))
    assert path == [] and bonus == 5  # 0.3 is under the threshold


def test_greedy_follows_the_argmax_child_among_siblings():
    logits = torch.log(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.6, 0.3]) + 1e-12)
    allowed = np.arange(5, 8)
    rows = torch.stack([logits] * 4)
    path, bonus = accept([5, 6, 6], [-1, -1, 1], rows, [allowed] * 4, AcceptParams())
    assert path == [1, 2] and bonus == 6
