"""Tree verification: acceptance rules and the per-sequence verifier the Triton model wraps."""

from specrec.verify.engine import TargetVerifier, VerifyError, VerifyRequest, VerifyResult
from specrec.verify.rules import AcceptParams, accept

__all__ = ["AcceptParams", "TargetVerifier", "VerifyError", "VerifyRequest", "VerifyResult", "accept"]
