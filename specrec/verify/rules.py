"""Acceptance rules: which path of a draft tree the target keeps, and the token it adds after it.

Vocabulary (as in vLLM's rejection sampler): *accepted* tokens are draft nodes the target keeps, in
root-down order; the *bonus* token is the target's own choice after the last accepted node (after a
rejection it is also called the recovered token). Rows of `logits` are the target's outputs: row 0 at
the root (the last committed token), row i + 1 after tree node i. `allowed[r]` is the grammar's set
at row r, or None where the node itself broke the grammar (such a node is never accepted).

Modes:
- greedy (lossless): follow the child equal to the constrained argmax; bonus = argmax where none is.
- stochastic (lossless sampling): SpecInfer's multi-candidate rule, chosen by how the tree's children were
  drafted (AcceptParams.draft_children), never by whether draft probabilities came along. "top_k" (what our
  drafters do): children are deterministic picks, point masses: accept child x with probability P(x), else
  zero P(x), renormalise and try the next. "sampled": each child drawn i.i.d. from q (duplicates kept as
  separate children), q given per expanded row: min(1, P/q) with residual P <- norm(max(0, P - q)).
  All rejected: the bonus is sampled from what is left of P. (The q rule on top-k children is biased:
  tests/test_verify_exact.py computes both rules' exact output distributions.)
- relaxed (DARE, lossy): accept a child whose token is in the target's top-k with P >= min_prob
  (else only the argmax counts); the longest such branch wins; bonus = argmax.
- beam: nothing is accepted; the target answers every row's `beam_width` best children (specrec.decoding.beam)
  and keeps only the context: top-K retrieval by (speculative) beam search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from specrec.decoding.select import constrained_argmax, constrained_probs, sample

MODES = ("greedy", "stochastic", "relaxed", "beam")
DRAFT_CHILDREN = ("top_k", "sampled")  # how a tree's children were chosen: the stochastic rule depends on it
NO_BONUS = -1  # the accepted path ended the list (EOS): nothing follows


@dataclass(frozen=True)
class AcceptParams:
    mode: str = "greedy"
    temperature: float = 1.0
    relaxed_top_k: int = 2
    relaxed_min_prob: float = 0.1
    draft_children: str = "top_k"
    beam_width: int = 0  # beam mode: children answered per row, 1..MAX_BEAM_WIDTH


class Draws(Protocol):
    """The randomness of the stochastic rule (a seeded torch generator in service; exact enumeration in tests)."""

    def bernoulli(self, prob: float) -> bool: ...

    def categorical(self, probs: torch.Tensor) -> int: ...


class TorchDraws:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def bernoulli(self, prob: float) -> bool:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64)) < prob

    def categorical(self, probs: torch.Tensor) -> int:
        return sample(probs / probs.sum(), self.generator)


def children_of(parents: list[int]) -> list[list[int]]:
    """children[r] = tree nodes whose parent is row r (row 0 = root, row i + 1 = node i)."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        kids[p + 1].append(i)
    return kids


def accept(tokens: list[int], parents: list[int], logits: torch.Tensor, allowed: list[np.ndarray | None],
           params: AcceptParams, generator: torch.Generator | Draws | None = None,
           draft_probs: torch.Tensor | None = None) -> tuple[list[int], int]:
    """Returns (accepted node indices root-down, bonus token). logits: [n + 1, vocab]. draft_probs: [n + 1, vocab],
    the drafter's q per row, used only for children drafted by sampling (params.draft_children == "sampled")."""
    kids = children_of(parents)
    if params.mode == "greedy":
        return _greedy(tokens, kids, logits, allowed)
    if params.mode == "relaxed":
        return _relaxed(tokens, kids, logits, allowed, params)
    if params.mode == "stochastic":
        draws = generator if generator is not None and not isinstance(generator, torch.Generator) \
            else TorchDraws(generator or torch.Generator())
        if params.draft_children not in DRAFT_CHILDREN:
            raise ValueError(f"unknown draft_children {params.draft_children!r}; choose one of "
                             f"{', '.join(DRAFT_CHILDREN)}")
        if params.draft_children == "sampled" and draft_probs is None:
            raise ValueError("children drafted by sampling need the drafter's q per row (DRAFT_PROBS)")
        q = draft_probs if params.draft_children == "sampled" else None
        return _stochastic(tokens, kids, logits, allowed, params.temperature, draws, q)
    raise ValueError(f"unknown verification mode {params.mode!r}; choose one of {', '.join(MODES)}")


def _finished(allowed: np.ndarray | None) -> bool:
    return allowed is None or len(allowed) == 0


def _greedy(tokens: list[int], kids: list[list[int]], logits: torch.Tensor,
            allowed: list[np.ndarray | None]) -> tuple[list[int], int]:
    path: list[int] = []
    row = 0
    while not _finished(allowed[row]):
        best = constrained_argmax(logits[row], allowed[row])  # type: ignore[arg-type]
        match = next((c for c in kids[row] if tokens[c] == best), None)
        if match is None:
            return path, best
        path.append(match)
        row = match + 1
    return path, NO_BONUS


def _relaxed_set(logits: torch.Tensor, allowed: np.ndarray, params: AcceptParams) -> set[int]:
    probs = constrained_probs(logits, allowed, 1.0)
    top = torch.topk(probs, min(params.relaxed_top_k, len(allowed)))
    ok = {int(t) for p, t in zip(top.values, top.indices, strict=True) if float(p) >= params.relaxed_min_prob}
    return ok or {constrained_argmax(logits, allowed)}


def _relaxed(tokens: list[int], kids: list[list[int]], logits: torch.Tensor, allowed: list[np.ndarray | None],
             params: AcceptParams) -> tuple[list[int], int]:
    def longest(row: int) -> list[int]:
        if _finished(allowed[row]):
            return []
        ok = _relaxed_set(logits[row], allowed[row], params)  # type: ignore[arg-type]
        best: list[int] = []
        for c in kids[row]:
            if tokens[c] in ok:
                branch = [c] + longest(c + 1)
                best = branch if len(branch) > len(best) else best
        return best

    path = longest(0)
    last = path[-1] + 1 if path else 0
    if _finished(allowed[last]):
        return path, NO_BONUS
    return path, constrained_argmax(logits[last], allowed[last])  # type: ignore[arg-type]


def _stochastic(tokens: list[int], kids: list[list[int]], logits: torch.Tensor, allowed: list[np.ndarray | None],
                temperature: float, draws: Draws, draft_probs: torch.Tensor | None) -> tuple[list[int], int]:
    """draft_probs given: the children were sampled from them (else they are top-k picks)."""
    path: list[int] = []
    row = 0
    while not _finished(allowed[row]):
        p = constrained_probs(logits[row], allowed[row], temperature)  # type: ignore[arg-type]
        q = draft_probs[row].double() if draft_probs is not None and kids[row] else None
        chosen = _try_children(tokens, kids[row], p, q, draws)
        if chosen is None:
            return path, draws.categorical(p)
        path.append(chosen)
        row = chosen + 1
    return path, NO_BONUS


def _try_children(tokens: list[int], children: list[int], p: torch.Tensor, q: torch.Tensor | None,
                  draws: Draws) -> int | None:
    """Recursive rejection over siblings; p is reduced in place to the residual on each rejection."""
    for c in children:
        x = tokens[c]
        total = float(p.sum())
        if total <= 0:
            break
        if q is None:  # a top-k child: q is a point mass at x
            if draws.bernoulli(float(p[x]) / total):
                return c
            p[x] = 0.0
        else:
            if draws.bernoulli(float(p[x]) / total / float(q[x]) if float(q[x]) > 0 else 0.0):
                return c
            p.copy_(torch.clamp(p / total - q, min=0.0))
    return None
