"""The tiny drafters the drafting tests share: trained on first use (a couple of minutes), then cached
beside the tiny target under SPECREC_HOME."""

from __future__ import annotations

from pathlib import Path

from specrec.artifacts import Artifacts
from specrec.drafting.commands import build_retrieval
from specrec.drafting.retrieval import POOL_DIR
from specrec.training.drafter import TrainSpec, train_drafter, trained


def ensure_tiny_drafters(arts: Artifacts) -> Path:
    """<artifacts>/drafter (PAD-Rec + HASS, tiny profile) and <artifacts>/retrieval; returns the directory."""
    assert arts.profile.name == "tiny", "tests train drafters at the tiny profile only"
    if not trained(arts, TrainSpec()):
        train_drafter(arts, TrainSpec(), progress=False)
    if not (arts.directory / POOL_DIR / "meta.json").is_file():
        build_retrieval(arts, progress=False)
    return arts.directory
