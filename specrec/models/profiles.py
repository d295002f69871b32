"""Named model sizes and training budgets; one place for every profile's numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetProfile:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    steps: int
    batch_size: int
    lr: float
    max_history: int = 20  # items of history the model sees
    list_len: int = 10  # items per generated list
    max_len: int = 512  # positions the model supports


TARGET_PROFILES = {
    # tests: < 1M parameters, ~1 minute on 2 CPU cores
    "tiny": TargetProfile("tiny", hidden=64, layers=2, heads=2, intermediate=192, steps=400, batch_size=32, lr=3e-3),
    # `make run` default: a few M parameters, < 10 minutes
    "small": TargetProfile("small", hidden=192, layers=4, heads=4, intermediate=512, steps=900, batch_size=32,
                           lr=2e-3),
    # benchmarks: >= 20M parameters (27M), so a tree costs little more than a step. ~2.6 s a step of 16 lists on
    # 2 CPU cores: 1000 steps (16k lists, a sixth of an epoch of ML-100k's windows) take ~45 minutes, resumable in
    # chunks (see README); the drafters distilled from it reach tau 7.65 at 32 nodes
    "bench": TargetProfile("bench", hidden=512, layers=8, heads=8, intermediate=1536, steps=1000, batch_size=16,
                           lr=8e-4),
}


def target_profile(name: str) -> TargetProfile:
    try:
        return TARGET_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(TARGET_PROFILES)}") from None
