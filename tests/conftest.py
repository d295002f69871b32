"""Shared fixtures: the tiny ML-100k artifacts (trained once, cached under SPECREC_HOME)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from specrec.artifacts import Artifacts
from specrec.models.llama import Transformer
from specrec.pipeline import prepare

# Tests share 2 cores with servers they start; one thread each keeps timings sane.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_artifacts() -> Artifacts:
    """ML-100k with the tiny target: trained on first use (about a minute), then loaded from the cache."""
    os.environ.setdefault("SPECREC_HOME", str(Path.home() / ".cache" / "specrec"))
    return prepare("ml-100k", "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_target(tiny_artifacts: Artifacts) -> Transformer:
    return Transformer.from_pretrained(tiny_artifacts.target_dir)


@pytest.fixture(scope="session")
def tiny_drafter(tiny_artifacts: Artifacts) -> Path:
    """The tiny PAD-Rec drafter and retrieval pool beside the tiny target (trained once, then cached)."""
    from tests.drafter_artifacts import ensure_tiny_drafters

    return ensure_tiny_drafters(tiny_artifacts)
