"""TargetVerifier: per-sequence KV state and one batched forward for many sequences' trees.

A sequence's committed tokens are in its cache row except the newest one (the previous bonus token),
which is *pending*: the next forward feeds pending tokens + the tree, with the tree hanging off the
last pending token. After acceptance the cache keeps pending + accepted nodes, compacted, and the
new bonus token becomes the pending root. Requests that fail validation get a VerifyError and leave
every sequence's state as it was.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specrec.decoding.beam import MAX_BEAM_WIDTH, Expansion
from specrec.decoding.select import constrained_logprob, top_children
from specrec.models.llama import Transformer
from specrec.models.precision import parse_dtype, set_precision
from specrec.models.steps import Block, build_step
from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.constraint import ConstraintError, ListConstraint, ListState
from specrec.semantic_ids.trie import ItemTrie
from specrec.tree_shape import tree_problem
from specrec.verify.rules import DRAFT_CHILDREN, MODES, NO_BONUS, AcceptParams, accept

MAX_SEED = 2**64 - 1  # torch.Generator takes an unsigned 64-bit seed


class VerifyError(Exception):
    """A request the verifier refuses; code is a gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class VerifyRequest:
    sequence_id: int
    tree_tokens: list[int]
    tree_parents: list[int]
    context: list[int] | None = None
    start: bool = False
    end: bool = False
    params: AcceptParams = AcceptParams()
    seed: int = 0
    n_items: int = 10
    exclude_history: bool = True
    banned: list[int] = field(default_factory=list)  # item indices no list may hold (read with the context)
    allowed: list[int] = field(default_factory=list)  # if any: the only item indices a list may hold (likewise)
    draft_probs: torch.Tensor | None = None  # [n_tree + 1, vocab] or None


@dataclass
class VerifyResult:
    accepted_tokens: list[int]  # accepted path's tokens then the bonus token (none if the list ended)
    accepted_nodes: list[int]
    done: bool
    live_sequences: int
    logprobs: list[float] = field(default_factory=list)  # per accepted token: the target's score (committed_logprobs)
    expansions: list[Expansion | None] = field(default_factory=list)  # beam mode: per row (root, then each node)


@dataclass
class Sequence:
    row: int
    constraint: ListConstraint
    state: ListState  # grammar state after all committed tokens
    committed: list[int]
    pending: list[int]  # committed tokens not yet in the cache (a chain)
    generator: torch.Generator
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Prepared:
    req: VerifyRequest
    seq: Sequence
    allowed: list[np.ndarray | None]  # per row: root, then each node
    states: list[ListState | None]


class TargetVerifier:
    def __init__(self, artifacts: Path, device: str = "cpu", max_sequences: int = 64, max_len: int = 512,
                 idle_timeout_s: float = 60.0, target_subdir: str = "target", dtype: str = "float32",
                 model: Transformer | None = None):
        """`model`: verify with this model instead of the artifacts' (the quality guard checks candidates)."""
        self.device = torch.device(device)
        self.sids = SemanticIds.load(artifacts)
        self.trie = ItemTrie(self.sids)
        model = model or Transformer.from_pretrained(Path(artifacts) / target_subdir, device=self.device)
        self.model = set_precision(model, parse_dtype(dtype))
        self.max_len = min(max_len, self.model.args.max_len)  # tokens a sequence may reach
        # one spare slot per row: a full row's padding in a batch writes there (see build_step)
        self.cache = self.model.new_cache(max_sequences, self.max_len + 1)
        self.idle_timeout_s = idle_timeout_s
        self.sequences: OrderedDict[int, Sequence] = OrderedDict()  # least recently used first
        self.free_rows = list(range(max_sequences))[::-1]
        self.vocab_size = self.sids.vocab.size

    @property
    def live_sequences(self) -> int:
        return len(self.sequences)

    # -- state -----------------------------------------------------------------------------------
    def end(self, sequence_id: int) -> None:
        seq = self.sequences.pop(sequence_id, None)
        if seq is not None:
            self.cache.lengths[seq.row] = 0
            self.free_rows.append(seq.row)

    def expire_idle(self, now: float | None = None) -> list[int]:
        """Free sequences idle longer than the timeout (Triton's own idle timeout does not reach us)."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self.sequences.items() if now - s.last_used > self.idle_timeout_s]
        for sid in stale:
            self.end(sid)
        return stale

    def _claim_row(self, busy: set[int]) -> int:
        if not self.free_rows:  # evict the least recently used sequence not in this batch
            victim = next((sid for sid in self.sequences if sid not in busy), None)
            if victim is None:
                raise VerifyError("RESOURCE_EXHAUSTED", f"the target holds {self.cache.n_rows} live sequences, its "
                                  "cap; retry later or raise max_sequences")
            self.end(victim)
        return self.free_rows.pop()

    def _open(self, req: VerifyRequest) -> Sequence:
        """A new sequence from CONTEXT, validated but holding no cache row yet (row -1)."""
        if req.n_items < 1 or req.n_items > 200:
            raise VerifyError("INVALID_ARGUMENT", f"n_items must be in 1..200, got {req.n_items}")
        if not 0 <= req.seed <= MAX_SEED:
            raise VerifyError("INVALID_ARGUMENT", f"seed must be in 0..2**64-1, got {req.seed}")
        self._check_tokens("CONTEXT", req.context or [])
        try:
            constraint = ListConstraint(self.trie, req.n_items, req.exclude_history, req.banned, req.allowed)
            state = constraint.start(list(req.context or []))
        except ConstraintError as e:
            raise VerifyError("INVALID_ARGUMENT", f"CONTEXT is not a valid list prefix: {e}") from None
        gen = torch.Generator().manual_seed(req.seed)
        return Sequence(-1, constraint, state, list(req.context or []), list(req.context or []), gen)

    # -- validation ------------------------------------------------------------------------------
    def _check_tokens(self, name: str, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise VerifyError("INVALID_ARGUMENT", f"{name} holds token {bad[0]} outside the vocabulary "
                              f"0..{self.vocab_size - 1}")

    def _check_tree(self, req: VerifyRequest) -> None:
        if problem := tree_problem(req.tree_tokens, req.tree_parents, self.vocab_size):
            raise VerifyError("INVALID_ARGUMENT", f"TREE_TOKENS / TREE_PARENTS: {problem}")
        _check_params(req.params)
        if req.draft_probs is not None:
            self._check_probs(req.draft_probs, len(req.tree_tokens))
        elif req.params.mode == "stochastic" and req.params.draft_children == "sampled" and req.tree_tokens:
            raise VerifyError("INVALID_ARGUMENT", "draft_children = sampled needs DRAFT_PROBS (the drafter's q per "
                              "row): the acceptance rule for sampled children divides by it")

    def _check_probs(self, probs: torch.Tensor, n: int) -> None:
        if tuple(probs.shape) != (n + 1, self.vocab_size):
            raise VerifyError("INVALID_ARGUMENT", f"DRAFT_PROBS must hold (nodes + 1) x vocab = {(n + 1)} x "
                              f"{self.vocab_size} values, got {tuple(probs.shape)}")
        # rejection sampling divides by q and samples the residual: NaN, negative or unnormalised rows break it
        sums = probs.double().sum(dim=1)
        bad = ~torch.isfinite(probs).all(dim=1) | (probs < 0).any(dim=1) | ((sums - 1).abs() > 1e-3) & (sums != 0)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise VerifyError("INVALID_ARGUMENT", f"DRAFT_PROBS row {row} is not a distribution (finite, >= 0, "
                              f"summing to 1, or all 0 where nothing was drafted): sum {float(sums[row]):.4g}")

    def _prepare(self, req: VerifyRequest, busy: set[int]) -> _Prepared:
        """Validate everything first; only a request that passes takes a cache row (or evicts anyone)."""
        self._check_tree(req)
        seq = self.sequences.get(req.sequence_id)
        needs_open = req.start or seq is None or (req.context is not None and req.context != seq.committed)
        if needs_open:
            if req.context is None:
                raise VerifyError("INVALID_ARGUMENT", f"sequence {req.sequence_id} has no state here (never started, "
                                  "ended, or evicted): send CONTEXT with the committed tokens to rebuild it")
            seq = self._open(req)
        assert seq is not None
        if seq.state.finished:
            raise VerifyError("INVALID_ARGUMENT", f"sequence {req.sequence_id} already ended its list with EOS")
        cached = 0 if needs_open else self.cache.lengths[seq.row]
        needed = cached + len(seq.pending) + len(req.tree_tokens)
        if needed > self.max_len:
            raise VerifyError("INVALID_ARGUMENT", f"sequence would reach {needed} tokens, over the target's "
                              f"limit of {self.max_len}")
        states: list[ListState | None] = [seq.state]
        for tok, par in zip(req.tree_tokens, req.tree_parents, strict=True):
            parent = states[par + 1]
            states.append(None if parent is None else seq.constraint.advance(parent, tok))
        allowed = [None if s is None else seq.constraint.allowed(s) for s in states]
        if needs_open:
            self.end(req.sequence_id)
            seq.row = self._claim_row(busy)
            self.cache.lengths[seq.row] = 0
        return _Prepared(req, seq, allowed, states)

    # -- verification ----------------------------------------------------------------------------
    def verify_batch(self, reqs: list[VerifyRequest]) -> list[VerifyResult | VerifyError]:
        """Verify every request's tree in one forward. END requests free state after answering."""
        self.expire_idle()
        results: list[VerifyResult | VerifyError | None] = [None] * len(reqs)
        prepared: list[tuple[int, _Prepared]] = []
        busy = {r.sequence_id for r in reqs}
        seen: set[int] = set()
        for i, req in enumerate(reqs):
            if req.sequence_id in seen:  # Triton batches one request per sequence; a library caller might not
                results[i] = VerifyError("INVALID_ARGUMENT", f"sequence {req.sequence_id} has two requests in one "
                                         "batch; send the next only after the previous one's answer")
                continue
            seen.add(req.sequence_id)
            if req.end and not req.tree_tokens and req.context is None and not req.start:
                self.end(req.sequence_id)  # a bare END: nothing to verify
                results[i] = VerifyResult([], [], True, self.live_sequences)
                continue
            try:
                prep = self._prepare(req, busy)
            except VerifyError as e:
                results[i] = e
                continue
            self.sequences[req.sequence_id] = prep.seq
            prepared.append((i, prep))
        if prepared:
            for (i, _prep), res in zip(prepared, self._run([p for _, p in prepared]), strict=True):
                results[i] = res
        for i, req in enumerate(reqs):
            if req.end:
                self.end(req.sequence_id)
                if isinstance(results[i], VerifyResult):
                    results[i].live_sequences = self.live_sequences  # type: ignore[union-attr]
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _run(self, batch: list[_Prepared]) -> list[VerifyResult]:
        blocks = []
        for p in batch:
            k = len(p.seq.pending)
            parents = list(range(-1, k - 1)) + [k - 1 if q < 0 else q + k for q in p.req.tree_parents]
            blocks.append(Block(p.seq.row, p.seq.pending + p.req.tree_tokens, parents))
        step = build_step(self.cache, blocks, self.device)
        # token-packed: a plain step batched with a large tree, or with a prefill, costs its own tokens only
        logits = self.model(step.tokens, step.positions, self.cache, step.rows, step.slots, step.mask, step.n_real)
        rows = [logits[b, len(p.seq.pending) - 1: len(p.seq.pending) + len(p.req.tree_tokens)]
                for b, p in enumerate(batch)]
        return [self._expand(p, r) if p.req.params.mode == "beam" else self._commit(p, r)
                for p, r in zip(batch, rows, strict=True)]

    def _expand(self, p: _Prepared, logits: torch.Tensor) -> VerifyResult:
        """Beam mode: every row's best children; nothing is committed. The cache keeps the context but its last
        token, which stays pending: every tree hangs off it and row 0 (the root's expansion) is always answered."""
        seq, width = p.seq, p.req.params.beam_width
        base = self.cache.lengths[seq.row]
        self.cache.keep_path(seq.row, [base + i for i in range(len(seq.pending) - 1)])
        seq.pending = seq.pending[-1:]
        seq.last_used = time.monotonic()
        self.sequences.move_to_end(p.req.sequence_id)
        rows = logits.float().cpu()
        expansions = [None if ok is None or not len(ok) else Expansion(*top_children(rows[r], ok, width))
                      for r, ok in enumerate(p.allowed)]
        return VerifyResult([], [], False, self.live_sequences, expansions=expansions)

    def _commit(self, p: _Prepared, logits: torch.Tensor) -> VerifyResult:
        seq, req = p.seq, p.req
        path, bonus = accept(req.tree_tokens, req.tree_parents, logits.float().cpu(), p.allowed, req.params,
                             seq.generator, req.draft_probs)
        k = len(seq.pending)
        base = self.cache.lengths[seq.row]
        self.cache.keep_path(seq.row, [base + i for i in range(k)] + [base + k + n for n in path])
        accepted = [req.tree_tokens[n] for n in path]
        state = p.states[path[-1] + 1] if path else seq.state
        assert state is not None
        if bonus != NO_BONUS:
            nxt = seq.constraint.advance(state, bonus)
            assert nxt is not None, "the bonus token always obeys the grammar"
            state = nxt
            accepted.append(bonus)
        seq.state, seq.committed = state, seq.committed + accepted
        seq.pending = [bonus] if bonus != NO_BONUS else []
        seq.last_used = time.monotonic()
        self.sequences.move_to_end(req.sequence_id)
        return VerifyResult(accepted, path, state.finished, self.live_sequences,
                            committed_logprobs(accepted, path, logits, p.allowed))


def committed_logprobs(accepted: list[int], path: list[int], logits: torch.Tensor,
                       allowed: list[np.ndarray | None]) -> list[float]:
    """The score of each accepted token (path, then bonus) at the row it was chosen from: node n hangs off the
    row of its parent, so the path's rows are the root then each accepted node; the bonus follows the last."""
    rows = [0] + [n + 1 for n in path]
    scores = []
    for tok, row in zip(accepted, rows, strict=False):  # no bonus after EOS: one row is left over
        ok = allowed[row]
        assert ok is not None, "an accepted token always obeys the grammar"
        scores.append(constrained_logprob(logits[row].float().cpu(), ok, tok))
    return scores


def _check_params(params: AcceptParams) -> None:
    """Acceptance parameters the rules can act on: NaN or negative ones would crash sampling mid-batch."""
    problem = None
    if params.mode not in MODES:
        problem = f"mode {params.mode!r} unknown; use one of {', '.join(MODES)}"
    elif not (math.isfinite(params.temperature) and params.temperature >= 0):
        problem = f"temperature must be a finite number >= 0, got {params.temperature}"
    elif params.relaxed_top_k < 1:
        problem = f"relaxed_top_k must be >= 1, got {params.relaxed_top_k}"
    elif not 0 <= params.relaxed_min_prob <= 1:
        problem = f"relaxed_min_prob must be in 0..1, got {params.relaxed_min_prob}"
    elif params.draft_children not in DRAFT_CHILDREN:
        problem = f"draft_children {params.draft_children!r} unknown; use one of {', '.join(DRAFT_CHILDREN)}"
    elif params.mode == "beam" and not 1 <= params.beam_width <= MAX_BEAM_WIDTH:
        problem = f"beam_width must be in 1..{MAX_BEAM_WIDTH} in beam mode, got {params.beam_width}"
    if problem:
        raise VerifyError("INVALID_ARGUMENT", problem)
