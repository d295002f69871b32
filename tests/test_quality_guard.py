"""The quality guard (issue #20): after training, the target is checked against popularity on held-out users; a
model that is not better is said loudly, with what to try, and the verdict is kept beside the weights."""

from __future__ import annotations

import json
import logging

import torch

from specrec.models.llama import Transformer
from specrec.quality_guard import REPORT, check_quality


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
    after = (tiny_artifacts.target_dir / REPORT).read_text() if (tiny_artifacts.target_dir / REPORT).is_file() \
        else None
    assert after == before  # checking another model never overwrites the artifacts' own verdict
