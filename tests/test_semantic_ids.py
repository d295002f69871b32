"""Semantic IDs, the item trie and the list grammar: uniqueness, round trips, exact masks, no repeats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specrec.decoding.plain import decode
from specrec.semantic_ids import EOS, SEP, SemanticIds, build_semantic_ids
from specrec.semantic_ids.constraint import ConstraintError, ListConstraint
from specrec.semantic_ids.trie import ItemTrie


def test_every_item_has_a_unique_id_that_round_trips(tiny_artifacts, tmp_path):
    sids = tiny_artifacts.sids
    assert len({tuple(c) for c in sids.codes}) == sids.n_items
    for item in range(sids.n_items):
        assert sids.item_of_tokens(sids.item_tokens(item)) == item
    sids.save(tmp_path)
    loaded = SemanticIds.load(tmp_path)
    assert np.array_equal(loaded.codes, sids.codes) and loaded.item_ids == sids.item_ids


def test_ids_stay_unique_when_many_items_share_a_vector():
    vectors = np.zeros((300, 4), dtype=np.float32)  # all identical: only the collision level can separate
    vectors[:150, 0] = 1.0
    sids = build_semantic_ids(vectors, np.arange(300), [str(i) for i in range(300)], [""] * 300, n_levels=2,
                              codebook=4)
    assert len({tuple(c) for c in sids.codes}) == 300


small_trie = ItemTrie(build_semantic_ids(np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32),
                                         np.arange(60), [str(i) for i in range(60)], [""] * 60, n_levels=2,
                                         codebook=4))


@settings(max_examples=60, deadline=None)
@given(used=st.sets(st.integers(0, 59), max_size=40), item=st.integers(0, 59), depth=st.integers(0, 2))
def test_trie_allows_exactly_the_unused_valid_continuations(used, item, depth):
    sids = small_trie.sids
    tokens = sids.item_tokens(item)
    node = small_trie.root
    for tok in tokens[:depth]:
        node = small_trie.child(node, tok)
    used_pos = np.unique(small_trie.position[sorted(used)]) if used else np.zeros(0, dtype=np.int64)
    allowed = set(int(t) for t in small_trie.allowed(node, used_pos))
    expected = {sids.item_tokens(i)[depth] for i in range(sids.n_items)
                if i not in used and sids.item_tokens(i)[:depth] == tokens[:depth]}
    assert allowed == expected


def test_the_trie_holds_a_bounded_cache_and_every_node_keeps_exact_children(monkeypatch):
    """A service walks many nodes over its life: the children it keeps are capped (caching every node a 1M-item
    catalog has held ~730 MB per process), and a node evicted and asked again gets the same children."""
    import specrec.semantic_ids.trie as trie_module

    monkeypatch.setattr(trie_module, "CHILDREN_CACHE", 8)
    trie = ItemTrie(small_trie.sids)
    tokens = [small_trie.sids.item_tokens(i) for i in range(small_trie.sids.n_items)]
    for _ in range(2):  # the second walk finds most nodes evicted
        nodes = [trie.root]
        while nodes:
            node = nodes.pop()
            if node[0] == trie.depth:
                continue
            kids = trie.children(node)
            below = [trie.order[p] for p in range(node[1], node[2])]
            assert list(kids.tokens) == sorted({tokens[i][node[0]] for i in below})
            assert int(kids.hi[-1]) == node[2] and list(kids.lo[1:]) == list(kids.hi[:-1])
            nodes += [(node[0] + 1, int(lo), int(hi)) for lo, hi in zip(kids.lo, kids.hi, strict=True)]
            assert trie.children.cache_info().currsize <= 8


def test_a_token_tuple_that_is_no_item_is_refused():
    sids = small_trie.sids
    assert sids.item_of_tokens(sids.item_tokens(7)) == 7
    assert sids.item_of_tokens(sids.item_tokens(7)[:-1]) is None  # too short
    assert sids.item_of_tokens([SEP] * sids.n_levels) is None  # not code tokens
    assert sids.item_of_tokens(list(reversed(sids.item_tokens(7)))) is None  # codes from the wrong levels
    taken = {tuple(c) for c in sids.codes}
    free = next((*c[:-1], last) for c in sids.codes for last in range(sids.vocab.level_sizes[-1])
                if (*c[:-1], last) not in taken)  # a valid code on every level, no item's tuple
    assert sids.item_of_tokens([sids.vocab.token(lv, int(c)) for lv, c in enumerate(free)]) is None


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_any_walk_the_grammar_allows_yields_n_distinct_items_then_eos(n_items, seed):
    rng = np.random.default_rng(seed)
    constraint = ListConstraint(small_trie, n_items, exclude_history=True)
    history = [int(i) for i in rng.choice(60, size=3, replace=False)]
    prompt = [1] + sum((small_trie.sids.item_tokens(i) + [SEP] for i in history), []) + [4]
    state, out = constraint.start(prompt), []
    while not state.finished:
        tok = int(rng.choice(constraint.allowed(state)))
        state = constraint.advance(state, tok)
        out.append(tok)
    items = constraint.list_items(out)
    assert out[-1] == EOS and len(items) == n_items and len(set(items)) == n_items
    assert not set(items) & set(history)


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 6), n_banned=st.integers(0, 40), allow_list=st.booleans(), seed=st.integers(0, 10_000))
def test_advance_takes_exactly_the_tokens_allowed_names(n_items, n_banned, allow_list, seed):
    """At every step of a walk, with history, banned items and an allow-list, advance accepts a token iff allowed()
    lists it: the one-child check advance makes agrees with the whole list the drafter and the target mask by."""
    rng = np.random.default_rng(seed)
    n = small_trie.sids.n_items
    banned = [int(i) for i in rng.choice(n, size=min(n_banned, n), replace=False)]
    only = {"allowed": [int(i) for i in rng.choice(n, size=n // 2, replace=False)]} if allow_list else {}
    history = [int(i) for i in rng.choice(n, size=3, replace=False)]
    prompt = [1] + sum((small_trie.sids.item_tokens(i) + [SEP] for i in history), []) + [4]
    constraint = ListConstraint(small_trie, n_items, exclude_history=True, banned=banned, **only)
    try:
        state = constraint.start(prompt)
    except ConstraintError:
        return
    vocab = small_trie.vocab.size
    while not state.finished:
        choices = set(constraint.allowed(state).tolist())
        assert {t for t in range(vocab) if constraint.advance(state, t) is not None} == choices
        state = constraint.advance(state, int(rng.choice(sorted(choices))))


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 4), n_allowed=st.integers(1, 12), n_banned=st.integers(0, 4),
       seed=st.integers(0, 10_000))
def test_an_allow_list_is_the_grammar_its_banned_complement_is(n_items, n_allowed, n_banned, seed):
    """A filter sent as the items allowed (the short form of an allow-list) gives, at every step of any walk, the
    same choices as the same filter sent as every other item banned; history items inside and outside the
    allow-list, banned items inside it, and the too-few-items refusal included."""
    rng = np.random.default_rng(seed)
    n = small_trie.sids.n_items
    allowed = [int(i) for i in rng.choice(n, size=n_allowed, replace=False)]
    banned = [int(i) for i in rng.choice(allowed, size=min(n_banned, n_allowed), replace=False)]
    history = [int(i) for i in rng.choice(allowed, size=min(2, n_allowed), replace=False)] + \
        [int(i) for i in rng.choice(n, size=2, replace=False)]
    prompt = [1] + sum((small_trie.sids.item_tokens(i) + [SEP] for i in history), []) + [4]
    short = ListConstraint(small_trie, n_items, exclude_history=True, banned=banned, allowed=allowed)
    long = ListConstraint(small_trie, n_items, exclude_history=True,
                          banned=sorted(set(range(n)) - set(allowed) | set(banned)))
    try:
        want = long.start(prompt)
    except ConstraintError:
        with pytest.raises(ConstraintError):
            short.start(prompt)
        return
    got = short.start(prompt)
    while not want.finished:
        choices = long.allowed(want)
        assert np.array_equal(short.allowed(got), choices)
        tok = int(rng.choice(choices))
        want, got = long.advance(want, tok), short.advance(got, tok)
    assert got.finished


def test_grammar_rejects_broken_contexts_clearly(tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    for bad in ([1, 2, 3], [5, 4], [1, 5, 6, 4]):
        try:
            constraint.start(bad)
        except ConstraintError as e:
            assert str(e)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_greedy_decoding_is_deterministic_and_valid(tiny_artifacts, tiny_target):
    constraint = tiny_artifacts.constraint()
    prompts = [tiny_artifacts.prompt(u) for u in range(16)]
    first = decode(tiny_target, constraint, prompts)
    again = decode(tiny_target, constraint, prompts[::-1])[::-1]
    assert [d.tokens for d in first] == [d.tokens for d in again]
    for u, d in enumerate(first):
        assert len(d.items) == 10 and len(set(d.items)) == 10
        assert not set(d.items) & set(int(i) for i in tiny_artifacts.split.train[u][-20:])


def test_randomized_svd_of_a_sparse_matrix_finds_the_dense_svds_top_factors():
    """Large catalogs take a randomized SVD that never densifies the user x item matrix: on a low-rank-plus-noise
    matrix small enough to check densely, it finds the same top singular values and item subspace."""
    from scipy import sparse

    from specrec.semantic_ids.codebook import centred_randomized_svd

    rng = np.random.default_rng(0)
    users, items, rank = 600, 900, 6
    scores = rng.normal(size=(users, rank)) @ rng.normal(size=(rank, items)) + rng.normal(size=(users, items))
    x = sparse.csr_matrix((scores > 2.0).astype(np.float64))  # ~7% dense 0/1, structure from the low rank
    s, vt = centred_randomized_svd(x, 8, seed=1)
    dense = x.toarray() - x.toarray().mean(axis=0, keepdims=True)
    _, s_ref, vt_ref = np.linalg.svd(dense, full_matrices=False)
    assert np.allclose(s[:rank], s_ref[:rank], rtol=1e-3)
    overlap = np.linalg.svd(vt[:rank] @ vt_ref[:rank].T, compute_uv=False)
    assert overlap.min() > 0.999  # the same top item subspace


def test_balanced_assignment_respects_every_groups_capacity():
    import torch

    from specrec.semantic_ids.rqkmeans import balanced_assign

    rng = np.random.default_rng(3)
    m, k = 500, 8
    groups = torch.as_tensor(rng.integers(0, 7, size=m))
    dist = torch.as_tensor(rng.random((m, k)), dtype=torch.float32)
    sizes = torch.bincount(groups)
    capacity = (sizes + k - 1) // k
    assign = balanced_assign(dist, capacity, groups)
    assert (assign >= 0).all()
    for g in range(len(sizes)):
        counts = torch.bincount(assign[groups == g], minlength=k)
        assert int(counts.max()) <= int(capacity[g])
    # alone, an item whose nearest code has room gets it: the nearest pairs are served first
    single = balanced_assign(dist[:k], 1)
    assert len(set(single.tolist())) == k
