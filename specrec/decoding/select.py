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


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
