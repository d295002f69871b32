"""Drafting many sessions at once through one step batcher (pooled cache rows, merged forwards): every session gets
exactly the trees it gets alone, forwards really are shared, and rows return to the pool."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from specrec.artifacts import Artifacts
from specrec.drafting.base import Budget, load_drafter
from specrec.drafting.batching import PAGE_ROWS
from specrec.drafting.model_drafter import ModelDrafter
from specrec.drafting.offline import eval_users
from tests.drafter_artifacts import ensure_tiny_drafters
from tests.test_drafting import assert_same_tree, random_commit

BUDGETS = [Budget(6, 16, 4), Budget(12, 12, 1, 0.02), Budget(8, 32, 8)]


@pytest.fixture(scope="module")
def drafter_dir(tiny_artifacts: Artifacts):
    return ensure_tiny_drafters(tiny_artifacts)


def _session_rounds(drafter: ModelDrafter, prompt: list[int], constraint, seed: int, rounds: int,
                    barrier: threading.Barrier | None) -> list[tuple[list[int], object]]:
    """(context, tree) per round of one session that drafts, drafts ahead and commits random paths."""
    rng = np.random.default_rng(seed)
    session = drafter.open(prompt, constraint)
    out = []
    for r in range(rounds):
        if session.finished:
            break
        if barrier is not None:
            barrier.wait()  # every thread asks for its tree at the same moment: the forwards must be shared
        tree = session.draft(BUDGETS[(seed + r) % len(BUDGETS)])
        out.append((list(session.context), tree))
        session.prepare_ahead(guesses=4)
        session.commit(random_commit(tree, constraint, session.state, rng))
    session.close()
    return out


def test_concurrent_sessions_get_exactly_their_lone_trees_in_shared_forwards(drafter_dir, tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    users = eval_users(tiny_artifacts, 4)
    n = PAGE_ROWS + 4  # two pages
    prompts = [tiny_artifacts.prompt(users[i % len(users)]) for i in range(n)]
    drafter = load_drafter("model", drafter_dir)
    barrier = threading.Barrier(n, timeout=60)
    results: list[list | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _session_rounds(drafter, prompts[i], constraint, i, 5, None if i % 7 == 6 else barrier)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)
            barrier.abort()

    # one thread in seven skips the barrier: it runs beside the others at its own pace
    barrier = threading.Barrier(n - len([i for i in range(n) if i % 7 == 6]), timeout=60)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counters = drafter.batcher.counters
    assert counters.mean_batch > 2.0, counters  # shared forwards, not one per session
    alone = load_drafter("model", drafter_dir)
    for i in range(n):
        assert results[i], i
        for r, (context, tree) in enumerate(results[i]):
            budget = BUDGETS[(i + r) % len(BUDGETS)]
            assert_same_tree(tree, alone.open(context, constraint).draft(budget))
    gc.collect()
    assert drafter.pool.rows_in_use == 0  # closed sessions gave their rows back


def test_a_forgotten_session_gives_its_row_back(drafter_dir, tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    drafter = load_drafter("model", drafter_dir)
    prompt = tiny_artifacts.prompt(eval_users(tiny_artifacts, 1)[0])
    sessions = [drafter.open(prompt, constraint) for _ in range(3)]
    assert drafter.pool.rows_in_use == 3
    del sessions
    gc.collect()
    assert drafter.pool.rows_in_use == 0


def test_draft_ahead_never_grows_a_page_past_its_cap_and_empty_pages_shrink_back(drafter_dir, tiny_artifacts):
    """Guesses drafted ahead for wide trees once grew every row of a page to thousands of slots for good (the draft
    service reached 7.7 GB after a few loaded phases); now they fit a capped page, and an empty page shrinks, but for
    the first page (the one a quiet service keeps using; at most one page's growth is held)."""
    from specrec.drafting.model_drafter import AHEAD_PAGE_SLOTS

    constraint = tiny_artifacts.constraint()
    drafter = load_drafter("model", drafter_dir)
    prompts = [tiny_artifacts.prompt(u) for u in eval_users(tiny_artifacts, 3)]
    sessions = [drafter.open(prompts[i % 3], constraint) for i in range(PAGE_ROWS + 1)]  # two pages
    first = sessions[0].page.cache.max_len
    drafted = 0
    for s in sessions[:2] + sessions[-1:]:
        s.draft(Budget(16, 64, 8))
        drafted += s.prepare_ahead(guesses=8)
        assert s.page.cache.max_len <= max(first, AHEAD_PAGE_SLOTS)
    assert drafted, "draft-ahead must still draft within the cap"
    pages = drafter.pool.pages
    assert len(pages) == 2 and all(p.cache.max_len > drafter.pool.slots for p in pages), "both pages should have grown"
    for s in sessions:
        s.close()
    assert pages[1].cache.max_len == drafter.pool.slots
    assert drafter.pool.slots < pages[0].cache.max_len <= max(first, AHEAD_PAGE_SLOTS)


def test_one_request_after_another_does_not_regrow_the_page(drafter_dir, tiny_artifacts):
    """At concurrency 1 every request's session lands on the first page; it keeps the room draft-ahead grew it to,
    instead of copying the page again for each request (which held wide trees past their deadline)."""
    constraint = tiny_artifacts.constraint()
    drafter = load_drafter("model", drafter_dir)
    caches = []
    for u in eval_users(tiny_artifacts, 3):
        session = drafter.open(tiny_artifacts.prompt(u), constraint)
        session.draft(Budget(16, 64, 8))
        session.prepare_ahead(guesses=8)
        caches.append(session.page.cache)
        session.close()
    assert len(drafter.pool.pages) == 1
    assert caches[1] is caches[2], "the second and third requests grew (copied) the page again"
