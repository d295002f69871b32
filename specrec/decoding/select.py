"""Choosing a token from logits under the grammar's allowed set: shared by decoding, verifying and drafting."""

from __future__ import annotations

import numpy as np
import torch


def constrained_argmax(logits: torch.Tensor, allowed: np.ndarray) -> int:
    """logits: [vocab]. The allowed token with the highest logit (lowest id on ties)."""
    idx = torch.as_tensor(allowed, dtype=torch.long)
    return int(idx[int(torch.argmax(logits[idx]))])


def constrained_probs(logits: torch.Tensor, allowed: np.ndarray, temperature: float) -> torch.Tensor:
    """The target's sampling distribution: softmax(logits / T) renormalised over allowed tokens. [vocab]."""
    idx = torch.as_tensor(allowed, dtype=torch.long)
    probs = torch.zeros_like(logits, dtype=torch.float64)
    probs[idx] = torch.softmax(logits[idx].double() / max(temperature, 1e-6), dim=-1)
    return probs


def constrained_logprob(logits: torch.Tensor, allowed: np.ndarray, token: int) -> float:
    """log P(token) under the target's distribution over the allowed tokens at temperature 1: the score of a
    committed token. A forced token (one allowed) scores 0 whether or not a model saw it."""
    idx = torch.as_tensor(allowed, dtype=torch.long)
    if len(idx) == 1:
        return 0.0
    logp = torch.log_softmax(logits[idx].double(), dim=-1)
    return float(logp[int(torch.nonzero(idx == token)[0])])


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def top_children(logits: torch.Tensor, allowed: np.ndarray, width: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The `width` allowed tokens of highest log-probability (as constrained_logprob scores them), best first,
    lower token first on ties: one beam's expansion."""
    idx = torch.as_tensor(allowed, dtype=torch.long)
    if len(idx) == 1:
        return (int(idx[0]),), (0.0,)
    logp = torch.log_softmax(logits[idx].double(), dim=-1)
    order = torch.sort(logp, descending=True, stable=True).indices[:width]  # allowed is sorted: ties keep token order
    return tuple(int(t) for t in idx[order]), tuple(float(v) for v in logp[order])
