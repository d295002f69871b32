"""A bfloat16 target stays exact: trees, chains and batches of sequences commit bit for bit what plain bfloat16
decoding commits, because the forward is batch-invariant; where a machine's kernels cannot promise that, the target
refuses bfloat16 with a message naming the fix instead of serving lists that may differ."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from specrec.decoding.plain import decode
from specrec.drafting.base import load_drafter
from specrec.models import packed
from specrec.models.packed import packing_available
from specrec.models.precision import PrecisionError, set_precision
from specrec.speculation.local import speculate
from specrec.speculation.policy import make_policy
from specrec.verify import TargetVerifier
from tests.drafter_artifacts import ensure_tiny_drafters
from tests.test_verify_engine import run_until_done

N_USERS = 10


@pytest.fixture(scope="module")
def bf16(tiny_artifacts) -> TargetVerifier | PrecisionError:
    """The bfloat16 verifier, or the refusal this machine's kernels earn (also a behaviour the tests check)."""
    try:
        return TargetVerifier(tiny_artifacts.directory, max_sequences=16, dtype="bfloat16")
    except PrecisionError as e:
        return e


def _refusal_is_clear(e: PrecisionError) -> None:
    assert "float32" in str(e) and "SPECREC_TARGET_DTYPE" in str(e)


def test_bfloat16_trees_commit_plain_bfloat16_greedy_output(tiny_artifacts, bf16):
    if isinstance(bf16, PrecisionError):
        _refusal_is_clear(bf16)
        return
    assert bf16.model.dtype == torch.bfloat16 and bf16.model.invariant_rows > 0
    constraint = tiny_artifacts.constraint()
    prompts = {300 + u: tiny_artifacts.prompt(u) for u in range(N_USERS)}
    reference = {s: d.tokens for s, d in zip(prompts, decode(bf16.model, constraint, list(prompts.values())),
                                             strict=True)}
    # all sequences verified together in token-packed batches, trees that follow the truth and trees that do not
    assert run_until_done(bf16, constraint, prompts, np.random.default_rng(0), truth_by_seq=reference) == reference
    assert run_until_done(bf16, constraint, prompts, np.random.default_rng(1), n_nodes=5) == reference
    assert bf16.live_sequences == 0


def test_bfloat16_speculation_with_a_drafter_commits_plain_bfloat16_output(tiny_artifacts, bf16):
    """The in-process engine the orchestrator runs, with the model drafter: chains, trees and the adaptive policy."""
    if isinstance(bf16, PrecisionError):
        _refusal_is_clear(bf16)
        return
    drafter = load_drafter("model", ensure_tiny_drafters(tiny_artifacts))
    constraint = tiny_artifacts.constraint()
    prompts = [tiny_artifacts.prompt(u) for u in range(N_USERS, N_USERS + 4)]
    plain = [d.tokens for d in decode(bf16.model, constraint, prompts)]
    for spec in ("chain:16", "fixed:8:32", "adaptive"):
        for prompt, reference in zip(prompts, plain, strict=True):
            out, stats = speculate(prompt, constraint, make_policy(spec), bf16, drafter)
            assert out == reference, spec
            assert stats.fallback_rounds == 0
    assert bf16.live_sequences == 0


@pytest.mark.parametrize("kernel", ["packed", "F.linear"])
def test_kernels_that_depend_on_the_batch_are_refused(tiny_target, monkeypatch, kernel):
    """A projection whose result depends on how many rows share it (as some kernels' blocking does) must stop
    bfloat16 from starting, not silently break exactness: the packed kernel the forward uses, or F.linear."""
    model = copy.deepcopy(tiny_target)
    if kernel == "packed" and not packing_available(torch.bfloat16):
        # oneDNN packs bfloat16 only with AVX-512 or AVX-NE-CONVERT (an AVX2 AMD EPYC has neither): then the forward
        # must never call the packed kernel, so no batch dependence of it can reach a bfloat16 list
        def absent(*_):
            raise AssertionError("the bfloat16 forward called a packed kernel this CPU does not have")

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", absent)
        set_precision(model, torch.bfloat16)
        assert model.invariant_rows > 0
        return
    if kernel == "packed":
        plain_op = torch.ops.mkldnn._linear_pointwise

        def batch_dependent_op(x, *args):
            out = plain_op(x, *args)
            return out + (x.shape[0] > 1) * out.abs().mean() * 1e-2

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", batch_dependent_op)
    else:
        plain_forward = nn.Linear.forward

        def batch_dependent(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            out = plain_forward(self, x)
            return out + (x.shape[0] > 1) * out.abs().mean() * 1e-2

        monkeypatch.setattr(nn.Linear, "forward", batch_dependent)
        monkeypatch.setattr(packed, "_dense", True)  # every projection through nn.Linear
    with pytest.raises(PrecisionError) as e:
        set_precision(model, torch.bfloat16)
    _refusal_is_clear(e.value)
    assert model.invariant_rows == 0
