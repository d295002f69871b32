"""Plain (non-speculative) constrained decoding: the reference every speculative mode is checked against."""

from specrec.decoding.plain import decode
from specrec.decoding.select import constrained_argmax, constrained_probs

__all__ = ["constrained_argmax", "constrained_probs", "decode"]
