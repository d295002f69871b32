"""specrec_target: Triton Python-backend adapter over specrec.verify.TargetVerifier.

One request = one token tree for one sequence (correlation id; START/END from request.flags()).
Triton hands execute() the requests its oldest-first sequence batcher gathered; all their trees are
verified in ONE forward pass. Inputs (batch dim implicit, one row per request):

    CONTEXT       INT64 [-1]  optional; the full committed tokens. Needed at START and whenever this
                              instance holds no state for the sequence (it is then rebuilt).
    TREE_TOKENS   INT64 [-1]  draft tree tokens, parents first; may be empty (plain decoding step)
    TREE_PARENTS  INT64 [-1]  parent index per node; -1 = child of the last committed token
    DRAFT_PROBS   FP32  [-1]  optional, stochastic mode; [n_tree + 1, vocab] flattened row-major
    BANNED_ITEMS  INT64 [-1]  optional, with CONTEXT; item indices no list may hold (the request's filters)
    ALLOWED_ITEMS INT64 [-1]  optional, with CONTEXT; if given, the only item indices a list may hold

Request parameters (JSON): mode (greedy | stochastic | relaxed | beam), beam_width (beam mode), temperature,
seed, relaxed_top_k, relaxed_min_prob, draft_children (top_k | sampled: how the tree's children were drafted;
stochastic mode applies the matching rule, and DRAFT_PROBS are used only for sampled children), n_items and
exclude_history (read when the sequence starts or is rebuilt).

Outputs:
    ACCEPTED_TOKENS INT64 [-1]  the accepted path's tokens, then the bonus token
    ACCEPTED_NODES  INT64 [-1]  tree indices of the accepted path
    DONE            BOOL  [1]   the list finished with EOS
    LIVE_SEQUENCES  INT64 [1]   sequences this instance holds state for, after this request
    MODEL_VERSION   BYTES [1]   the identity of the artifacts served (specrec.model_identity)
    ACCEPTED_LOGPROBS FP64 [-1] per accepted token: log P under the grammar-constrained distribution at T = 1
    BEAM_TOKENS     INT64 [-1]  beam mode: per row (root, then each node) its beam_width best children,
                                (nodes + 1) x beam_width flattened, -1 where there are fewer (else empty)
    BEAM_LOGPROBS   FP64  [-1]  beam mode: their log-probabilities, as ACCEPTED_LOGPROBS scores tokens

A bad request gets an error response (INVALID_ARG, or UNAVAILABLE prefixed "RESOURCE_EXHAUSTED:"
when the live-sequence cap is reached) and changes no state, except that a bad END still ends its
sequence; the other requests of the batch are unaffected. A failure of the model itself answers
every request of the batch with INTERNAL and a plain message (the trace goes to the server log).
Per-sequence state is freed at END, on idle expiry and by LRU eviction past the cap.
"""

import json
import logging
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from specrec.decoding.beam import pack_expansions
from specrec.model_identity import artifact_version
from specrec.models.precision import PrecisionError
from specrec.verify import AcceptParams, TargetVerifier, VerifyError, VerifyRequest

log = logging.getLogger("specrec.target")
ERROR_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "RESOURCE_EXHAUSTED": "UNAVAILABLE", "NOT_FOUND": "NOT_FOUND"}


def _param(config, key, default=""):
    return config.get("parameters", {}).get(key, {}).get("string_value", "") or default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if "sequence_batching" not in config:
            raise pb_utils.TritonModelException("specrec_target needs sequence_batching in config.pbtxt")
        model_dir = _param(config, "SPECREC_TARGET_MODEL_DIR", os.environ.get("SPECREC_TARGET_MODEL_DIR", ""))
        if not model_dir or not os.path.isdir(model_dir):
            raise pb_utils.TritonModelException(
                f"no trained artifacts at {model_dir!r}: set SPECREC_TARGET_MODEL_DIR (or the config parameter) "
                "to a directory holding semantic_ids/ and target/ (specrec train-target prints it)")
        device = _param(config, "device", os.environ.get("SPECREC_DEVICE", "")) or (
            "cuda" if torch.cuda.is_available() else "cpu")
        if threads := os.environ.get("SPECREC_TORCH_THREADS"):
            torch.set_num_threads(int(threads))
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000))
        dtype = _param(config, "dtype", os.environ.get("SPECREC_TARGET_DTYPE", "")) or "float32"
        try:
            self.verifier = TargetVerifier(model_dir, device=device,
                                           max_sequences=int(_param(config, "max_sequences", "64")),
                                           max_len=int(_param(config, "max_len", "512")),
                                           idle_timeout_s=idle_us / 1e6, dtype=dtype)
        except PrecisionError as e:
            raise pb_utils.TritonModelException(f"SPECREC_TARGET_DTYPE={dtype}: {e}") from e
        self.version = artifact_version(os.path.realpath(model_dir))
        # Into Triton's own log (a stub's Python logging is not configured): what an operator checks on a GPU node.
        pb_utils.Logger.log_info(
            f"specrec_target {args.get('model_instance_name', '')}: device={device}, dtype={dtype} (batch-invariant "
            f"rows {self.verifier.model.invariant_rows or 'off'}), max_sequences="
            f"{_param(config, 'max_sequences', '64')}, max_len={_param(config, 'max_len', '512')}, "
            f"artifacts {model_dir} (version {self.version})")
        self._model_info = _report_version(self.version)


    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self._parse(request)))
            except VerifyError as e:
                responses[i] = _error(e)
                self._end_if_flagged(request)  # a malformed END still ends its sequence
        try:
            results = self.verifier.verify_batch([req for _, req in parsed])
        except Exception:  # a bug of ours: logged with its trace here, never sent to clients
            log.exception("verifying a batch of %d requests failed", len(parsed))
            failed = VerifyError("INTERNAL", "the target failed on this batch (the server log has the details); "
                                 "the request may be retried")
            results = [failed] * len(parsed)
            for _, req in parsed:
                if req.end:
                    self.verifier.end(req.sequence_id)
        for (i, req), res in zip(parsed, results, strict=True):
            responses[i] = _error(res) if isinstance(res, VerifyError) else pb_utils.InferenceResponse(
                output_tensors=_outputs(res, self.version, req.params.beam_width if res.expansions else 0))
        return responses

    def _end_if_flagged(self, request):
        sequence_id = request.correlation_id()
        if request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END and isinstance(sequence_id, int):
            self.verifier.end(sequence_id)

    def _parse(self, request):
        flags = request.flags()
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError as e:
            raise VerifyError("INVALID_ARGUMENT", f"request parameters are not JSON: {e}") from None
        accept = AcceptParams(mode=str(params.get("mode", "greedy")),
                              temperature=_number(params, "temperature", float, 1.0),
                              relaxed_top_k=_number(params, "relaxed_top_k", int, 2),
                              relaxed_min_prob=_number(params, "relaxed_min_prob", float, 0.1),
                              draft_children=str(params.get("draft_children", "top_k")),
                              beam_width=_number(params, "beam_width", int, 0))
        seed, n_items = _number(params, "seed", int, 0), _number(params, "n_items", int, 10)
        exclude = str(params.get("exclude_history", True)).lower() not in ("false", "0")
        sequence_id = request.correlation_id()
        if not isinstance(sequence_id, int):  # a string id would fail int() or collide with a numeric one
            raise VerifyError("INVALID_ARGUMENT", f"sequence id {sequence_id!r} is a string; use an integer id")
        tokens, parents = _ints(request, "TREE_TOKENS"), _ints(request, "TREE_PARENTS")
        probs = pb_utils.get_input_tensor_by_name(request, "DRAFT_PROBS")
        draft_probs = None
        if probs is not None:
            flat = torch.from_numpy(probs.as_numpy().reshape(-1).astype(np.float32))
            vocab = self.verifier.vocab_size
            if flat.numel() != (len(tokens or []) + 1) * vocab:
                raise VerifyError("INVALID_ARGUMENT", f"DRAFT_PROBS must hold (nodes + 1) x {vocab} values, "
                                  f"got {flat.numel()}")
            draft_probs = flat.view(-1, vocab)
        return VerifyRequest(sequence_id=sequence_id, tree_tokens=tokens or [],
                             tree_parents=parents or [], context=_ints(request, "CONTEXT"),
                             start=bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START),
                             end=bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END),
                             params=accept, seed=seed, n_items=n_items, exclude_history=exclude,
                             banned=_ints(request, "BANNED_ITEMS") or [], allowed=_ints(request, "ALLOWED_ITEMS") or [],
                             draft_probs=draft_probs)

    def finalize(self):
        self.verifier = None


def _report_version(version):
    """`specrec_model_info{version} 1` on Triton's own /metrics (the Python backend's custom metrics);
    the family and metric must stay referenced, or Triton drops them. A metric that cannot be made (metrics
    off) never stops the model from serving: the version still goes out with every answer."""
    try:
        family = pb_utils.MetricFamily(name="specrec_model_info",
                                       description="Artifact identity served (hash of semantic IDs + target weights).",
                                       kind=pb_utils.MetricFamily.GAUGE)
        metric = family.Metric(labels={"version": version})
        metric.set(1)
    except Exception as e:  # pb_utils raises its own TritonModelException types
        pb_utils.Logger.log_warn(f"specrec_model_info not exported: {e}")
        return None
    return family, metric


def _number(params, key, cast, default):
    """params[key] as int or float; a VerifyError naming the key when it is not one (say "abc" or "1e400")."""
    value = params.get(key, default)
    try:
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        raise VerifyError("INVALID_ARGUMENT", f"request parameter {key} = {value!r} is not "
                          f"{'an integer' if cast is int else 'a number'}") from None


def _ints(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else [int(x) for x in tensor.as_numpy().reshape(-1)]


def _error(e):
    code = getattr(pb_utils.TritonError, ERROR_CODES.get(e.code, "INTERNAL"))
    prefix = "RESOURCE_EXHAUSTED: " if e.code == "RESOURCE_EXHAUSTED" else ""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(prefix + str(e), code))


def _outputs(res, version, width):
    tokens, logprobs = pack_expansions(res.expansions, width)
    return [
        pb_utils.Tensor("BEAM_TOKENS", tokens.reshape(1, -1)),
        pb_utils.Tensor("BEAM_LOGPROBS", logprobs.reshape(1, -1)),
        pb_utils.Tensor("ACCEPTED_TOKENS", np.asarray(res.accepted_tokens, dtype=np.int64).reshape(1, -1)),
        pb_utils.Tensor("ACCEPTED_NODES", np.asarray(res.accepted_nodes, dtype=np.int64).reshape(1, -1)),
        pb_utils.Tensor("DONE", np.array([[res.done]], dtype=np.bool_)),
        pb_utils.Tensor("LIVE_SEQUENCES", np.array([[res.live_sequences]], dtype=np.int64)),
        pb_utils.Tensor("MODEL_VERSION", np.array([[version.encode()]], dtype=np.object_)),
        pb_utils.Tensor("ACCEPTED_LOGPROBS", np.asarray(res.logprobs, dtype=np.float64).reshape(1, -1)),
    ]
