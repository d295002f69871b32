"""The quality guard (issue #20): after training, the target is checked against popularity on held-out users; a
model that is not better is said loudly, with what to try, and the verdict is kept beside the weights."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from specrec.evaluation import transition_lists
from specrec.models.llama import Transformer
from specrec.quality_guard import REPORT, QualityVerdict, check_quality


def test_the_trained_tiny_target_beats_popularity_and_the_verdict_is_saved(tiny_artifacts):
    verdict = check_quality(tiny_artifacts, users=200)
    assert verdict.beats_popularity and verdict.users == 200 and verdict.epochs > 0
    saved = json.loads((tiny_artifacts.target_dir / REPORT).read_text())
    assert saved["beats_popularity"] and saved["target_ndcg"] == verdict.target_ndcg


def test_an_untrained_model_is_flagged_loudly_with_what_to_try(tiny_artifacts, tiny_target, caplog):
    torch.manual_seed(0)
    untrained = Transformer(tiny_target.args).eval()  # random weights: lists no better than chance
    before = (tiny_artifacts.target_dir / REPORT).read_text() if (tiny_artifacts.target_dir / REPORT).is_file() \
        else None
    with caplog.at_level(logging.WARNING, logger="specrec.quality_guard"):
        verdict = check_quality(tiny_artifacts, users=200, model=untrained)
    assert not verdict.beats_popularity
    assert verdict.target_ndcg < verdict.popularity_ndcg
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "NOT BETTER THAN POPULARITY" in warning and "--profile" in warning
    assert 0 <= verdict.beam_ndcg < verdict.popularity_ndcg < verdict.transition_ndcg  # chance is no beam either
    assert "Retrieve" not in warning and "little to learn" not in warning  # ML-100k has sequential signal
    after = (tiny_artifacts.target_dir / REPORT).read_text() if (tiny_artifacts.target_dir / REPORT).is_file() \
        else None
    assert after == before  # checking another model never overwrites the artifacts' own verdict


def test_the_verdict_says_which_cause_the_figures_point_to():
    """Synthetic data (bench/scale.py's catalogs): greedy lists lose to popularity while beam search from the same
    model wins, and a next-item baseline barely beats popularity. Each figure names its cause and what to try."""
    greedy_loses = QualityVerdict(target_ndcg=0.064, popularity_ndcg=0.123, users=300, k=10, epochs=0.76,
                                  beam_ndcg=0.131, transition_ndcg=0.144)
    text = greedy_loses.message("tiny")
    assert "Retrieve" in text and "little to learn beyond popularity" in text and "or longer" in text
    assert "--profile small or --profile bench" in text
    overtrained = QualityVerdict(0.05, 0.12, 300, 10, epochs=11.3, beam_ndcg=0.07, transition_ndcg=0.30)
    text = overtrained.message("small")
    assert "Retrieve" not in text and "little to learn" not in text and "unlikely to help" in text
    assert "--profile bench" in text and "--profile small" not in text
    assert QualityVerdict(0.2, 0.1, 300, 10, 1.0).message("tiny").startswith("the tiny target beats popularity")


def test_the_next_item_baseline_ranks_what_followed_the_last_item_most_often(tiny_artifacts):
    arts = tiny_artifacts
    users = [u for u in range(40) if len(arts.split.train[u])]
    lists = transition_lists(arts, users, 10)
    for u, recs in zip(users, lists, strict=True):
        last = int(arts.split.train[u][-1])
        seen = set(int(i) for i in arts.split.train[u][-arts.profile.max_history:])
        counts = np.zeros(arts.data.n_items, dtype=np.int64)
        for seq in arts.split.train:
            for i in np.flatnonzero(seq[:-1] == last):
                counts[seq[i + 1]] += 1
        followers = [i for i in np.argsort(-counts, kind="stable") if counts[i] and int(i) not in seen]
        assert len(recs) == 10 and not seen & set(recs) and len(set(recs)) == 10
        assert recs[:len(followers)] == [int(i) for i in followers[:10]]
