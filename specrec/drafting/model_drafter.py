"""PAD-Rec position-aware drafter: a small causal transformer over semantic-ID tokens.

On top of our flat Llama (`Transformer.hidden`, same attention and KV cache as the target):

    x   = E_tok[token] + lambda * E_slot[slot(token)]           (item-slot embedding, learnable lambda)
    h   = decoder(x)                                             (causal / tree attention)
    g   = sigmoid(W [h; E_step[k]])                              (context-driven gate)
    out = lm_head(h + g * E_step[k])                             (draft-step embedding)

slot(token) is the token's place inside its semantic ID (code level 0..L-1, SEP, other); k is how many
draft steps the input token lies past the last verified token (0 for committed tokens). The step
signal joins *after* the decoder, so cached keys and values never depend on k: a drafted node that
the target accepts keeps its cache entries exactly (rollback without recompute). Each signal can be
switched off (use_slot / use_step) for ablations. Saved as config.json + model.safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from specrec.calibration import DepthCalibration
from specrec.drafting.base import (
    Budget,
    Drafter,
    DraftError,
    DraftSession,
    DraftTree,
    StopPoint,
    learn_acceptance,
    register,
)
from specrec.drafting.batching import PAGE_ROWS, BatchCounters, CachePool, StepBatcher
from specrec.drafting.tree import Scratch, StepFn, TreeBuilder, TreeRoot, ValueFn, build_trees
from specrec.models.llama import KVCache, ModelArgs, Transformer
from specrec.models.packed import choose_kernel_by_rows, packed_linear, packing_available
from specrec.models.steps import Block, build_step
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import Vocabulary

log = logging.getLogger(__name__)

MODEL_TYPE = "specrec_pad_drafter"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_DIR = "drafter"  # <artifacts>/drafter; variants live in <artifacts>/drafter-<variant>
AHEAD_PAGE_SLOTS = 2048  # cache slots per row a page may grow to for trees drafted ahead (bench drafter: 4 KB each)


@dataclass(frozen=True)
class DrafterConfig:
    level_sizes: tuple[int, ...]  # the semantic-ID vocabulary this drafter speaks
    dim: int
    n_layers: int
    n_heads: int
    intermediate: int
    max_len: int = 512
    max_steps: int = 16  # draft steps with their own embedding; deeper steps share the last one
    use_slot: bool = True
    use_step: bool = True
    rope_theta: float = 10000.0

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary(tuple(self.level_sizes))

    @property
    def n_slots(self) -> int:
        return len(self.level_sizes) + 2  # code levels, SEP, other

    def model_args(self) -> ModelArgs:
        return ModelArgs(vocab_size=self.vocab.size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                         n_kv_heads=self.n_heads, intermediate=self.intermediate, rope_theta=self.rope_theta,
                         max_len=self.max_len)

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self), "level_sizes": list(self.level_sizes)}

    @classmethod
    def from_json(cls, cfg: dict) -> DrafterConfig:
        if cfg.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config model_type {cfg.get('model_type')!r} is not a {MODEL_TYPE}")
        fields = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "level_sizes": tuple(fields["level_sizes"])})


class PadDrafter(nn.Module):
    slot_table: torch.Tensor  # [vocab] item slot of each token

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        self.lm = Transformer(config.model_args())
        self.lm.lean = True
        vocab = config.vocab
        self.register_buffer("slot_table", torch.tensor([vocab.slot_of(t) for t in range(vocab.size)]),
                             persistent=False)
        self.slot_embed = nn.Embedding(config.n_slots, config.dim)
        self.slot_scale = nn.Parameter(torch.ones(()))
        self.step_embed = nn.Embedding(config.max_steps + 1, config.dim)
        self.step_gate = nn.Linear(2 * config.dim, config.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.step_embed.weight)  # starts as the plain drafter; steps learn their offsets

    @property
    def args(self) -> ModelArgs:
        return self.lm.args

    def n_params(self) -> int:
        """Parameters the drafter actually uses (switched-off signals do not count)."""
        skip = set()
        if not self.config.use_slot:
            skip |= {"slot_embed.weight", "slot_scale"}
        if not self.config.use_step:
            skip |= {"step_embed.weight", "step_gate.weight", "step_gate.bias"}
        return sum(p.numel() for name, p in self.named_parameters() if name not in skip)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> input embeddings [B, T, dim]."""
        x = self.lm.model.embed_tokens(tokens)
        if self.config.use_slot:
            x = x + self.slot_scale * self.slot_embed(self.slot_table[tokens])
        return x

    def head(self, h: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """h [B, T, dim] decoder output, steps [B, T] -> logits [B, T, vocab]."""
        if self.config.use_step:
            e = self.step_embed(steps.clamp(0, self.config.max_steps))
            gate = packed_linear(self.step_gate, torch.cat([h, e], dim=-1).flatten(0, -2), timed=True).view_as(h)
            h = h + torch.sigmoid(gate) * e
        return packed_linear(self.lm.lm_head, h.flatten(0, -2), timed=True).view(*h.shape[:-1], -1)

    def forward(self, tokens: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                rows: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab]; arguments as `Transformer.hidden`, plus steps [B, T] (draft step per token)."""
        h = self.lm.hidden(self.embed(tokens), positions, cache, rows, slots, mask)
        return self.head(h, steps)

    @torch.inference_mode()
    def choose_kernels(self) -> dict[str, str]:
        """Pick the faster projection kernel per row count for this drafter's forward now, timing forwards of 1, 2,
        4 ... rows (one draft step each) on a scratch cache, so that no request pays for it; returns the choice."""
        param = next(self.parameters())
        if param.device.type != "cpu" or not packing_available(param.dtype):
            return {}  # one kernel only (a GPU; packed weights off, or missing for this dtype): nothing to time
        cache = KVCache(self.args, 1, 96, device=param.device, dtype=param.dtype)
        cache.lengths[0] = 32  # a short history, as a draft step after a request's prompt sees

        def step(rows: int) -> None:
            positions = torch.arange(32, 32 + rows, device=param.device)[None]
            mask = torch.ones((1, rows, 32 + rows), dtype=torch.bool, device=param.device)
            tokens = torch.zeros((1, rows), dtype=torch.long, device=param.device)
            self(tokens, tokens, positions, cache, torch.zeros(1, dtype=torch.long, device=param.device), positions,
                 mask)

        return choose_kernel_by_rows(step)

    def sequence_logits(self, tokens: torch.Tensor, steps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab] of right-padded sequences (training; a scratch cache)."""
        bsz, t = tokens.shape
        param = next(self.parameters())
        cache = KVCache(self.args, bsz, t, device=param.device, dtype=param.dtype)
        positions, mask = causal_inputs(lengths.to(tokens.device), t)
        return self(tokens, steps, positions, cache, torch.arange(bsz, device=tokens.device), positions, mask)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> PadDrafter:
        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no drafter here (run `specrec train-drafter`)")
        model = cls(DrafterConfig.from_json(json.loads(path.read_text())))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.to(device).eval()


def causal_inputs(lengths: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] and causal mask [B, T, T] for right-padded sequences of these lengths (padding
    sees only itself), for a forward that writes token i to cache slot i."""
    idx = torch.arange(t, device=lengths.device)
    positions = idx.expand(len(lengths), t)
    causal = idx[None, :, None] >= idx[None, None, :]
    valid = idx[None, None, :] < lengths[:, None, None]
    return positions, (causal & valid) | torch.eye(t, dtype=torch.bool, device=lengths.device)[None]


def scratch_bound(budget: Budget, tokens_per_item: int) -> int:
    """Cache slots one tree may feed: per round, top_k frontier nodes, each with a forced chain."""
    b = budget.validated()
    return b.depth * b.top_k * (tokens_per_item + 1) + 2


class ModelDrafter(Drafter):
    """Sessions over one PadDrafter; each keeps its own KV cache (one row)."""

    def __init__(self, model: PadDrafter, name: str = "model", rows_per_batch: int = 32, batched: bool = True):
        """batched=False: a cache per session and a forward per session step (the design before batching)."""
        self.model = model.eval()
        self.name = name
        self.rows_per_batch = rows_per_batch
        self.pool = CachePool(model.args, model.config.max_len + 256, self.device,
                              page_rows=PAGE_ROWS if batched else 1)
        self.batcher = StepBatcher(model, self.device, merge=batched)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward_counts(self) -> BatchCounters:
        return self.batcher.counters

    def open(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> ModelSession:
        if constraint.trie.vocab.level_sizes != tuple(self.model.config.level_sizes):
            raise ValueError("this drafter was trained on another semantic-ID vocabulary")
        return ModelSession(self, constraint, context)

    def step_fn(self, cache: KVCache) -> StepFn:
        def step(tokens: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            dev = self.device
            return self.model(tokens.to(dev), steps.to(dev), positions.to(dev), cache, rows.to(dev), slots.to(dev),
                              mask.to(dev)).float().cpu()

        return step

    @torch.inference_mode()
    def trees_along(self, context: list[int], constraint: ListConstraint, continuation: list[int],
                    budget: Budget, learn: bool = True) -> list[DraftTree]:
        """All positions' trees in a few batched forwards: one prefill of context + continuation, its cache
        copied to one row per position, then every tree expanded together. Nodes are ranked by the drafter's
        calibration per depth (`acceptance`); learn: it then learns from each tree against the continuation, as
        serving learns from commits (batch by batch, so it lags by up to rows_per_batch positions)."""
        seq = list(context) + list(continuation)
        states = [constraint.start(context)]
        for tok in continuation[:-1]:
            nxt = constraint.advance(states[-1], tok)
            assert nxt is not None, "the continuation breaks the list grammar"
            states.append(nxt)
        extra = scratch_bound(budget, constraint.trie.depth + 1)
        out: list[DraftTree] = []
        logq: torch.Tensor | None = None
        for lo in range(0, len(continuation), self.rows_per_batch):
            hi = min(len(continuation), lo + self.rows_per_batch)
            cache = KVCache(self.model.args, hi - lo, len(seq) + extra, device=self.device)
            step = build_step(cache, [Block.chain(0, seq)], self.device)
            logits = self.model(step.tokens, torch.zeros_like(step.tokens), step.positions, cache, step.rows,
                                step.slots, step.mask)
            logq = torch.log_softmax(logits[0].float().cpu(), dim=-1)
            cache.k[:, 1:] = cache.k[:, :1]
            cache.v[:, 1:] = cache.v[:, :1]
            roots = [TreeRoot(t - lo, len(context) + t, len(context) + t, states[t], logq[len(context) + t - 1])
                     for t in range(lo, hi)]
            scratch = Scratch({t - lo: len(context) + t for t in range(lo, hi)}, cache.max_len)
            built = build_trees(self.step_fn(cache), constraint, roots, budget, scratch,
                                max_step=self.model.config.max_steps,
                                value_of=self.acceptance.log_accepted)
            out += [b.tree for b in built]
            if learn:
                for t, b in zip(range(lo, hi), built, strict=True):
                    learn_acceptance(self.acceptance, b.tree, continuation[t:])
        return out


@dataclass
class AheadBatch:
    """Trees drafted ahead together, one per guessed commit, all in the session's cache row (one forward per
    level for every guess); the builder may have been stopped between levels by the commit's arrival."""

    builder: TreeBuilder
    scratch: Scratch
    want_probs: bool


@dataclass
class AheadWork:
    slots: list[int]  # cache slots of the assumed tokens, in order
    root_logprobs: torch.Tensor  # log q after the assumed tokens
    batch: AheadBatch
    index: int  # this guess's tree in the batch


@dataclass
class _Pending:
    """A stop point on its way to becoming a guess: its path's cache slots and log q after the path."""

    point: StopPoint
    slots: list[int]
    out: torch.Tensor | None = None
    tail: list[int] = field(default_factory=list)  # tokens of the path still to feed, and their slots
    tail_slots: list[int] = field(default_factory=list)


class ModelSession(DraftSession):
    """The session's cache row (of the drafter's pooled cache) holds the committed tokens in slots [0, length);
    tree nodes go to scratch slots after them. A commit keeps the accepted nodes' cache entries (compacted) and
    feeds only what the drafter has not seen (usually just the bonus token). Every forward goes through the
    drafter's step batcher, so sessions drafting at the same time share forwards."""

    def __init__(self, drafter: ModelDrafter, constraint: ListConstraint, context: Sequence[int]):
        super().__init__(constraint, context)
        self.drafter = drafter
        self.model = drafter.model
        self.per_item = constraint.trie.depth + 1
        remaining = (constraint.n_items - self.state.n_done) * self.per_item + 1
        self.max_positions = len(self.context) + remaining
        if self.max_positions > self.model.config.max_len:
            raise DraftError(f"context of {len(self.context)} tokens plus a list of {constraint.n_items} items "
                             f"exceeds the drafter's {self.model.config.max_len} positions")
        self.page, self.row = drafter.pool.acquire(self.max_positions + 64)
        self._release = weakref.finalize(self, drafter.pool.release, self.page, self.row)
        page, row, batcher = self.page, self.row, drafter.batcher

        def step(tokens: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return batcher.step(page, row, tokens, steps, positions, slots, mask)

        self.step: StepFn = step
        self.fed: dict[tuple[int, ...], int] = {}
        self.outputs: dict[tuple[int, ...], torch.Tensor] = {}
        self.scratch_top = 0
        self.ahead_top = 0  # end of the scratch slots that guesses drafted ahead use (after the live tree's)
        self.root_logprobs = self._feed_chain(self.context)

    @property
    def cache(self) -> KVCache:
        return self.page.cache  # read anew each time: another session may have grown the page

    @property
    def length(self) -> int:
        return self.cache.lengths[self.row]

    def _ensure(self, slots: int, ceiling: int | None = None) -> None:
        """Grow the page (copying it) so that `slots` slots exist."""
        self.page.ensure(slots, ceiling)

    def _keep_path(self, slots: list[int]) -> None:
        with self.page.lock:  # not while the page grows (the copy would miss the move)
            self.cache.keep_path(self.row, slots)

    def close(self) -> None:
        super().close()
        self._release()

    @torch.inference_mode()
    def _feed_chain(self, tokens: list[int]) -> torch.Tensor:
        """Commit tokens to the cache after the prefix (draft step 0); log q [vocab] after the last one."""
        self._ensure(self.length + len(tokens) + 1)
        step = build_step(self.cache, [Block.chain(self.row, tokens)], self.drafter.device)
        logits = self.step(step.tokens, torch.zeros_like(step.tokens), step.positions, step.rows, step.slots,
                           step.mask)
        self.cache.lengths[self.row] += len(tokens)
        self.scratch_top, self.ahead_top = self.length, 0
        return torch.log_softmax(logits[0, -1], dim=-1)

    def _draft(self, budget: Budget, want_probs: bool) -> DraftTree:
        self._ensure(self.length + scratch_bound(budget, self.per_item) + 1)
        root = TreeRoot(self.row, self.length, self.length, self.state, self.root_logprobs)
        scratch = Scratch({self.row: self.length}, self.cache.max_len)
        built = build_trees(self.step, self.constraint, [root], budget, scratch, want_probs,
                            self.model.config.max_steps, self._value_of())[0]
        self.fed, self.outputs, self.scratch_top = built.fed, built.outputs, scratch.next[self.row]
        self.ahead_top = 0
        return built.tree

    def _value_of(self) -> ValueFn | None:
        """Nodes ranked by calibrated acceptance per depth, when the session has the drafter's calibration."""
        acceptance = self.acceptance
        return acceptance.log_accepted if self.calibrated_trees and isinstance(acceptance, DepthCalibration) else None

    @torch.inference_mode()
    def _advance(self, tokens: list[int]) -> None:
        kept = self._fed_prefix(tokens[:-1])  # at least the last token is fed again: its output roots the next tree
        if kept:
            self._keep_path(kept)
        self.root_logprobs = self._feed_chain(tokens[len(kept):])
        self.fed, self.outputs = {}, {}

    def _fed_prefix(self, tokens: list[int]) -> list[int]:
        slots = []
        for i in range(len(tokens)):
            slot = self.fed.get(tuple(tokens[: i + 1]))
            if slot is None:
                break
            slots.append(slot)
        return slots

    def _draft_ahead(self, path: list[int], state: ListState, budget: Budget,
                     want_probs: bool) -> tuple[list[int], AheadWork] | None:
        point = StopPoint(path, state, frozenset(), 0.0, 1.0)
        done = self._draft_ahead_batch([point], 1, budget, want_probs, lambda: False)
        return done[0] if done else None

    @torch.inference_mode()
    def _draft_ahead_batch(self, points: list[StopPoint], n: int, budget: Budget, want_probs: bool,
                           stop: Callable[[], bool], skip: int = 0) -> list[tuple[list[int], AheadWork]]:
        """The n likeliest (stop point, bonus) commits after the `skip` likeliest, ranked by q(path) * q(bonus),
        drafted together: one forward feeds any path tails the live tree did not expand, one feeds every guessed
        bonus token, then one per level grows every guess's tree (all in row 0's scratch slots, each guess seeing
        its own path)."""
        if not points:  # every stop point takes part: a likely bonus can make a less likely stop a top commit
            return []
        longest = max(len(p.path) for p in points) + 1
        # ahead slots start past where adopting a guess compacts its path to, so compaction never hits them
        start = max(self.scratch_top, self.ahead_top, self.length + longest)
        tails, per_guess = len(points) * (longest + 1), scratch_bound(budget, self.per_item)
        # guesses are a bet: they may use the page as it is, or grow it to AHEAD_PAGE_SLOTS, never further (every
        # row of a page grows with it, and pages are not returned while sessions live on them)
        n = min(n, (max(self.cache.max_len, AHEAD_PAGE_SLOTS) - start - tails - 1) // per_guess)
        if n < 1:
            return []
        self._ensure(start + tails + n * per_guess + 1, AHEAD_PAGE_SLOTS)
        scratch = Scratch({self.row: start}, self.cache.max_len)
        pending = [self._pending(p, scratch) for p in points]
        tails = [q for q in pending if q.tail]
        if tails:
            outs = self._feed_chains([(q.tail, q.tail_slots, q.slots, len(q.slots) + 1) for q in tails])
            for q, out in zip(tails, outs, strict=True):
                q.out, q.slots = out[-1], q.slots + q.tail_slots
        guesses = self._rank_bonuses(pending, skip + n)[skip:]
        if not guesses or stop():
            return []
        bonus_slots = [scratch.alloc(self.row) for _ in guesses]
        root_logq = self._feed_chains([([bonus], [slot], q.slots, 0)
                                       for (q, bonus, _), slot in zip(guesses, bonus_slots, strict=True)])
        roots = [TreeRoot(self.row, self.length, self.length + len(q.point.path) + 1, after, logq[-1],
                          extra_slots=q.slots + [slot])
                 for (q, _, after), slot, logq in zip(guesses, bonus_slots, root_logq, strict=True)]
        batch = AheadBatch(TreeBuilder(self.step, self.constraint, roots, budget, scratch,
                                       self.model.config.max_steps, self._value_of()), scratch, want_probs)
        batch.builder.run(stop)
        self.ahead_top = scratch.next[self.row]
        return [(q.point.path + [bonus], AheadWork(root.extra_slots, logq[-1], batch, i))
                for i, ((q, bonus, _), root, logq) in enumerate(zip(guesses, roots, root_logq, strict=True))]

    def _pending(self, point: StopPoint, scratch: Scratch) -> _Pending:
        path = point.path
        slots = self._fed_prefix(path)
        out = self.outputs.get(tuple(path)) if len(slots) == len(path) else None
        if out is not None:
            return _Pending(point, slots, out)
        slots = slots[: len(path) - 1] if len(slots) == len(path) else slots  # fed, not expanded: redo it
        tail = path[len(slots):]
        return _Pending(point, slots, None, tail, [scratch.alloc(self.row) for _ in tail])

    def _rank_bonuses(self, pending: list[_Pending], n: int) -> list[tuple[_Pending, int, ListState]]:
        """The n likeliest (stop point, bonus token, grammar after it): P(verification stops there) * q(bonus);
        lists that the bonus would end need no tree.

        q(bonus) is the drafter's, not renormalised without the point's children although the bonus is the target's
        token given that none of them was: where the drafter was sure of a child that verification rejects, its q of
        the other tokens says little about the target's. Offline (bench, chains of 16 with min_path_prob 0.05, 2 x 60
        held-out users), the top 4 guesses held the real commit in 45-47% of rounds renormalised, 70-75% not; the
        top 8 in 75-76% and 89-92% (uncut chains of 16: top 4 48% and 54%, top 8 58% and 67%)."""
        cands: list[tuple[float, int, int, _Pending]] = []
        for j, q in enumerate(pending):
            log_mass = math.log(q.point.mass)
            forced = self.constraint.forced(q.point.state)
            if forced is not None:
                if forced in q.point.exclude:  # the tree's own child: verification would have taken it
                    continue
                cands.append((log_mass, j, forced, q))
                continue
            allowed = [t for t in self.constraint.allowed(q.point.state).tolist() if t not in q.point.exclude]
            if not allowed or q.out is None:
                continue
            vals = q.out[torch.as_tensor(allowed)]
            top = torch.topk(vals, min(n, len(allowed)))
            cands += [(log_mass + float(v), j, allowed[int(i)], q)
                      for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        out = []
        for _, _, bonus, q in cands:
            after = self.constraint.advance(q.point.state, bonus)
            if after is not None and not after.finished:
                out.append((q, bonus, after))
            if len(out) == n:
                break
        return out

    def _feed_chains(self, chains: list[tuple[list[int], list[int], list[int], int]]) -> list[torch.Tensor]:
        """Feed chains into row 0's scratch slots in one forward: (tokens, their slots, the cache slots they see
        besides the committed prefix, the draft step of the first token or 0 for assumed-committed tokens).
        A chain continues the path its context slots hold. Returns log q [len(tokens), vocab] per chain."""
        n = sum(len(c[0]) for c in chains)
        span = max(self.length, max(max(c[1]) for c in chains) + 1)
        tokens, positions, steps, slots = [], [], [], []
        mask = torch.zeros((1, n, span), dtype=torch.bool)
        mask[0, :, : self.length] = True
        i = 0
        for toks, tok_slots, context_slots, first_step in chains:
            for j, (tok, slot) in enumerate(zip(toks, tok_slots, strict=True)):
                tokens.append(tok)
                positions.append(self.length + len(context_slots) + j)
                steps.append(min(first_step + j, self.model.config.max_steps) if first_step else 0)
                slots.append(slot)
                mask[0, i, context_slots] = True
                mask[0, i, tok_slots[: j + 1]] = True
                i += 1
        logits = self.step(torch.tensor([tokens]), torch.tensor([steps]), torch.tensor([positions]),
                           torch.tensor([self.row]), torch.tensor([slots]), mask)
        logq = torch.log_softmax(logits[0], dim=-1)
        out, i = [], 0
        for toks, *_ in chains:
            out.append(logq[i: i + len(toks)])
            i += len(toks)
        return out

    def _ahead_complete(self, work: AheadWork) -> bool:
        return work.batch.builder.done

    @torch.inference_mode()
    def _adopt_ahead(self, work: AheadWork) -> DraftTree:
        builder = work.batch.builder
        if not builder.done:  # stopped by the commit: finish this guess's tree only
            builder.keep_only(work.index)
            builder.run()
        built = builder.result(work.index, work.batch.want_probs)
        self._keep_path(work.slots)
        self.root_logprobs = work.root_logprobs
        # move the tree's nodes next to the committed prefix, so scratch space does not creep round after round
        paths = sorted(built.fed, key=built.fed.__getitem__)
        with self.page.lock:
            self.cache.move(self.row, [built.fed[p] for p in paths], self.length)
        self.fed = {p: self.length + i for i, p in enumerate(paths)}
        self.outputs = built.outputs
        self.scratch_top, self.ahead_top = self.length + len(paths), 0
        return built.tree


@register("model")
def load_model_drafter(artifacts: Path, name: str = "model", device: str = "cpu", **_: object) -> ModelDrafter:
    """"model" loads <artifacts>/drafter; "model:<dir>" loads another variant, e.g. model:drafter-plain."""
    variant = name.split(":", 1)[1] if ":" in name else DEFAULT_DIR
    model = PadDrafter.from_pretrained(Path(artifacts) / variant, device)
    if choices := model.choose_kernels():
        log.info("drafter %s projection kernels by rows in a step: %s", name,
                 ", ".join(f"{k} {v}" for k, v in choices.items()))
    return ModelDrafter(model, name=name)
