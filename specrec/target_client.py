"""Async client of Triton model specrec_target: verify token trees of one sequence, errors mapped to status codes."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from specrec.decoding.beam import Expansion, unpack_expansions
from specrec.security import TlsConfig
from specrec.semantic_ids.vocab import BOS, REC

MODEL_NAME = "specrec_target"
MODES = ("greedy", "stochastic", "relaxed", "beam")
# tritonclient sends the correlation id as an int64 request parameter.
MAX_SEQUENCE_ID = 2**63 - 1
PROBE_SEQUENCES = 2**61  # version probes use ids in [2**61, 2**62): requests draw 63-bit random ids
OUTPUTS = ("ACCEPTED_TOKENS", "ACCEPTED_NODES", "DONE", "LIVE_SEQUENCES", "MODEL_VERSION", "ACCEPTED_LOGPROBS",
           "BEAM_TOKENS", "BEAM_LOGPROBS")
# Busy, not down: Triton's queue is full, or model.py's live-sequence cap is reached (it
# answers UNAVAILABLE, the only nearby code the Python backend has, with this prefix). Both
# arrive as UNAVAILABLE, which clients retry at once: mapped to TargetOverloaded instead.
BUSY = ("exceeds maximum queue size", "RESOURCE_EXHAUSTED")
# What an overloaded target asks callers to wait before retrying (the orchestrator passes it on).
OVERLOAD_RETRY_AFTER_MS = 200
# Triton's sequence batcher refuses a non-START request for a sequence it holds no slot for
# (never started, ended, idle-released, server restarted); model.py, when it holds no state
# and got no CONTEXT, says "... has no state here" (the echo stand-in: "unknown sequence").
SEQUENCE_UNKNOWN = ("must specify the START flag", "has no state here", "unknown sequence")


@dataclass(frozen=True)
class VerifyOutcome:
    """What the target decided for one tree.

    accepted_tokens: the accepted path's tokens, then the bonus token (never empty on success).
    accepted_nodes:  tree indices of the accepted path (one shorter than accepted_tokens).
    done:            the list finished with EOS.
    live_sequences:  sequences the serving instance holds state for, after this request.
    model_version:   the identity of the artifacts the target serves (specrec.model_identity).
    logprobs:        per accepted token, the target's log-probability of it (the grammar-constrained
                     distribution at temperature 1).
    expansions:      beam mode: per row (the root, then each tree node) the target's best children.
    """

    accepted_tokens: list[int]
    accepted_nodes: list[int]
    done: bool
    live_sequences: int
    model_version: str = ""
    logprobs: list[float] = field(default_factory=list)
    expansions: list[Expansion | None] = field(default_factory=list)


class TargetError(Exception):
    """A verify request failed; `code` is the gRPC status, the message says what to do."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


class TargetUnavailable(TargetError):
    """Triton is down or unreachable (UNAVAILABLE), or its queue is full (RESOURCE_EXHAUSTED): retry later."""


class TargetOverloaded(TargetUnavailable):
    """The target is up but at capacity (queue full or sequence cap): RESOURCE_EXHAUSTED, retry after a pause."""

    def __init__(self, message: str, retry_after_ms: int = OVERLOAD_RETRY_AFTER_MS) -> None:
        super().__init__(message, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.retry_after_ms = retry_after_ms


class TargetInvalidArgument(TargetError):
    """The request is wrong (bad tree, bad parameters, ...): retrying it unchanged will not help."""


class TargetSequenceUnknown(TargetInvalidArgument):
    """The target holds nothing for this sequence: resend with `context` (all committed tokens)."""


class TargetClient:
    """One gRPC channel to Triton; safe to share between concurrent sequences of one event loop.

    Unary ModelInfer, not the ModelStreamInfer bidi stream: on loopback the stream saved
    0.2-0.4 ms a round (bench/transport.py, p50: 1.9 vs 1.6 ms with the shipped config,
    1.0 vs 0.75 ms with no batcher delay), 1-2 % of a CPU verify, while a stream loses
    what each round needs: a deadline and cancellation per request, gRPC status codes
    (stream errors are bare text) and per-request metadata (the W3C traceparent is
    fixed when the stream opens).
    """

    def __init__(self, url: str, model: str = MODEL_NAME, timeout_s: float = 5.0, tls: TlsConfig | None = None,
                 tls_name: str = "") -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url, **(tls or TlsConfig()).triton_kwargs(tls_name))
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    async def verify(
        self,
        sequence_id: int,
        tree_tokens: Sequence[int] | np.ndarray,
        tree_parents: Sequence[int] | np.ndarray,
        *,
        context: Sequence[int] | np.ndarray | None = None,
        start: bool = False,
        end: bool = False,
        mode: str = "greedy",
        temperature: float = 1.0,
        seed: int = 0,
        relaxed_top_k: int = 2,
        relaxed_min_prob: float = 0.1,
        n_items: int = 10,
        exclude_history: bool = True,
        banned: Sequence[int] = (),
        allowed: Sequence[int] = (),
        draft_probs: np.ndarray | None = None,
        beam_width: int = 0,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> VerifyOutcome:
        """Verify one tree (parents: -1 = child of the root); an empty tree asks for the next token.

        `context` (all committed tokens) is required with `start` and after the target lost the
        sequence; `draft_probs` [n_tree + 1, vocab] only in stochastic mode; `beam_width` in beam mode. `n_items`,
        `exclude_history`, `banned` (item indices no list may hold) and `allowed` (if any, the only ones it may) are
        read at START only.
        """
        _check_request(self.url, sequence_id, tree_tokens, tree_parents, mode)
        inputs = [_int64("TREE_TOKENS", tree_tokens), _int64("TREE_PARENTS", tree_parents)]
        if context is not None:
            inputs.append(_int64("CONTEXT", context))
            if len(banned):  # goes with CONTEXT: whenever the target may (re)build the sequence
                inputs.append(_int64("BANNED_ITEMS", banned))
            if len(allowed):
                inputs.append(_int64("ALLOWED_ITEMS", allowed))
        if draft_probs is not None:
            inputs.append(_tensor("DRAFT_PROBS", np.asarray(draft_probs, dtype=np.float32), "FP32"))
        params: dict[str, str | int | bool] = {
            "mode": mode,
            "temperature": str(float(temperature)),
            "seed": int(seed),
            "relaxed_top_k": int(relaxed_top_k),
            "relaxed_min_prob": str(float(relaxed_min_prob)),
        }
        if mode == "beam":
            params["beam_width"] = int(beam_width)
        start_params = {"n_items": int(n_items), "exclude_history": bool(exclude_history)}
        if start:
            params.update(start_params)
        try:
            result = await self._infer(sequence_id, inputs, start, end, params, timeout_s, headers)
        except TargetSequenceUnknown:
            if context is None or start:
                raise
            # Triton forgot the sequence (idle release, restart): START it again, and the
            # model rebuilds its state from CONTEXT. The deadline applies to each attempt.
            params.update(start_params)
            result = await self._infer(sequence_id, inputs, True, end, params, timeout_s, headers)
        return _outcome(result, len(tree_tokens) + 1)

    async def model_version(self) -> str:
        """The identity of the artifacts this target serves, from a throwaway sequence: START on a two-token
        context, then END (so a probe leaves no state behind)."""
        sequence_id = PROBE_SEQUENCES + secrets.randbelow(PROBE_SEQUENCES)
        outcome = await self.verify(sequence_id, [], [], context=[BOS, REC], start=True)
        await self.end(sequence_id)
        return outcome.model_version

    async def end(self, sequence_id: int, *, timeout_s: float | None = None) -> None:
        """Free the sequence's state on the target (END with an empty tree); a no-op if already gone."""
        try:
            await self.verify(sequence_id, [], [], end=True, timeout_s=timeout_s)
        except TargetSequenceUnknown:
            pass

    async def ready(self) -> bool:
        """True when the server and the model are ready; False when unreachable."""
        try:
            return bool(await self._client.is_model_ready(self.model, client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TargetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _infer(
        self,
        sequence_id: int,
        inputs: list[grpcclient.InferInput],
        start: bool,
        end: bool,
        params: dict[str, str | int | bool],
        timeout_s: float | None,
        headers: Mapping[str, str] | None,
    ) -> grpcclient.InferResult:
        try:
            return await self._client.infer(
                self.model,
                inputs,
                outputs=self._outputs,
                sequence_id=sequence_id,
                sequence_start=start,
                sequence_end=end,
                client_timeout=self.timeout_s if timeout_s is None else timeout_s,
                headers=dict(headers) if headers else None,
                parameters=params,
            )
        except InferenceServerException as exc:
            raise map_error(exc, self.url, sequence_id) from exc


def map_error(exc: InferenceServerException, url: str, sequence_id: int) -> TargetError:
    """Triton's error (status text like "StatusCode.UNAVAILABLE") as one of our exceptions."""
    code = _status_code(exc.status())
    message = exc.message() or str(exc)
    where = f"target {url}, sequence {sequence_id}"
    if any(marker in message for marker in BUSY):
        return TargetOverloaded(f"{where}: the target is at capacity ({message}); "
                                f"retry after ~{OVERLOAD_RETRY_AFTER_MS} ms")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return TargetUnavailable(f"{where}: Triton is unavailable ({message}); is it running?", code)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        if any(marker in message for marker in SEQUENCE_UNKNOWN):
            return TargetSequenceUnknown(f"{where}: {message}; resend with the full CONTEXT", code)
        return TargetInvalidArgument(f"{where}: {message}", code)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return TargetError(f"{where}: no answer before the deadline ({message})", code)
    return TargetError(f"{where}: {message}", code)


def _status_code(status: str | None) -> grpc.StatusCode:
    name = (status or "").removeprefix("StatusCode.")
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


def _check_request(
    url: str, sequence_id: int, tokens: Sequence[int] | np.ndarray, parents: Sequence[int] | np.ndarray, mode: str
) -> None:
    """Mistakes caught before they cost a round trip; the model checks the rest."""
    problem = None
    if not 1 <= sequence_id <= MAX_SEQUENCE_ID:
        problem = "sequence id out of range: use 1..2**63-1 (0 means no sequence)"
    elif len(tokens) != len(parents):
        problem = f"{len(tokens)} tree tokens but {len(parents)} parents"
    elif mode not in MODES:
        problem = f"unknown mode {mode!r}; use one of {', '.join(MODES)}"
    if problem:
        where = f"target {url}, sequence {sequence_id}"
        raise TargetInvalidArgument(f"{where}: {problem}", grpc.StatusCode.INVALID_ARGUMENT)


def _int64(name: str, values: Sequence[int] | np.ndarray) -> grpcclient.InferInput:
    return _tensor(name, np.asarray(values, dtype=np.int64), "INT64")


def _tensor(name: str, values: np.ndarray, dtype: str) -> grpcclient.InferInput:
    batch = values.reshape(1, -1)  # [1, n]: max_batch_size > 0 makes the batch dim explicit on the wire
    tensor = grpcclient.InferInput(name, list(batch.shape), dtype)
    tensor.set_data_from_numpy(batch)
    return tensor


def _outcome(result: grpcclient.InferResult, n_rows: int) -> VerifyOutcome:
    def row(name: str) -> np.ndarray:
        return result.as_numpy(name).reshape(-1)

    beam_tokens = row("BEAM_TOKENS")

    return VerifyOutcome(
        accepted_tokens=row("ACCEPTED_TOKENS").tolist(),
        accepted_nodes=row("ACCEPTED_NODES").tolist(),
        done=bool(row("DONE")[0]),
        live_sequences=int(row("LIVE_SEQUENCES")[0]),
        model_version=_text(row("MODEL_VERSION")[0]),
        logprobs=row("ACCEPTED_LOGPROBS").tolist(),
        expansions=unpack_expansions(beam_tokens, row("BEAM_LOGPROBS"), n_rows) if len(beam_tokens) else [],
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
