"""Distil the target into a small PAD-Rec drafter.

Data (sequence-level distillation): prompts cut from the training histories of users outside the
offline-evaluation set, each followed by the target's own greedy list, the context the drafter meets
at decode time when its drafts are accepted. The target's distribution at every list position,
renormalised over the grammar's allowed tokens, is computed once and cached.

Loss at each list position that is not grammar-forced (p = target, q = drafter, both trie-masked):
- a divergence D(p, q): forward KL, reverse KL, Jensen-Shannon or total variation (DistillSpec), a
  debiased Sinkhorn divergence (SinKD), entropy-balanced forward/reverse KL (BD-KD) or the Plackett-Luce
  likelihood of the target's top-K order (PLD);
- HASS's harmonised objective (`TrainSpec.hass_objective`): -sum over the target's top K tokens of p log q
  (sharpens what acceptance needs);
- HASS's harmonised context alignment (`TrainSpec.hass_alignment`): for part of each batch, cut the list at
  a random point, let the drafter draft `unroll` tokens itself, feed them back with their draft-step index,
  and distil the target's distribution after them. Step embeddings only learn from this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import InitVar, asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specrec.artifacts import Artifacts
from specrec.decoding.plain import decode
from specrec.drafting.model_drafter import DEFAULT_DIR, DrafterConfig, PadDrafter, causal_inputs
from specrec.drafting.offline import is_eval_user
from specrec.models.llama import KVCache, Transformer
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import PAD, REC
from specrec.training.examples import encode_prompt
from specrec.training.loop import train

log = logging.getLogger(__name__)
DIVERGENCES = ("fkl", "rkl", "js", "tvd", "sinkhorn", "bdkd")  # true divergences: >= 0, 0 at q = p
RANKING_LOSSES = ("pld",)  # list-wise: >= 0, lower the better q orders p's top K, but not 0 at q = p
OBJECTIVES = DIVERGENCES + RANKING_LOSSES  # what TrainSpec.divergence may name
DATA_DIR = "drafter-data"
SINKHORN_EPS = 0.1  # entropic regularisation of the Sinkhorn divergence, in units of the 0/1 ground cost
SINKHORN_ITERS = 20  # log-space Sinkhorn iterations (unrolled: gradients flow through them)
PLD_TOP_K = 8  # PLD: length of the target's ranking the drafter's scores must reproduce


@dataclass(frozen=True)
class DrafterProfile:
    name: str
    dim: int
    layers: int
    heads: int
    intermediate: int
    steps: int
    batch_size: int
    lr: float
    windows: int  # distillation prompts (target greedy lists)
    unroll: int = 3  # HASS: draft steps unrolled on the drafter's own tokens
    unroll_batch: int = 8
    unroll_weight: float = 1.0  # per unrolled position, relative to a teacher-forced one
    unroll_sample: bool = False  # unrolled tokens: the drafter's argmax (as HASS) or samples from q (DistillSpec)
    top_k: int = 1  # HASS top-K loss: the target's K best tokens (1 = its argmax, what greedy verification accepts)
    top_k_weight: float = 1.0


# Sized to <= 1/10 of the target profile of the same name (narrowed to fit when a larger vocabulary needs it:
# fit_profile); steps for CPU.
DRAFTER_PROFILES = {
    "tiny": DrafterProfile("tiny", dim=24, layers=1, heads=2, intermediate=48, steps=300, batch_size=32, lr=3e-3,
                           windows=800),
    "small": DrafterProfile("small", dim=64, layers=2, heads=4, intermediate=192, steps=1200, batch_size=32,
                            lr=2e-3, windows=4000),
    "bench": DrafterProfile("bench", dim=256, layers=2, heads=4, intermediate=768, steps=1000, batch_size=32,
                            lr=1e-3, windows=6000),
}


def drafter_profile(name: str) -> DrafterProfile:
    try:
        return DRAFTER_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(DRAFTER_PROFILES)}") from None


@dataclass(frozen=True)
class TrainSpec:
    """What makes one drafter variant: the divergence and which PAD-Rec / HASS parts are on.

    `hass` is a construction-time shorthand for both HASS switches (`TrainSpec(hass=False)`: no top-K loss and
    no unrolling, the meaning it had before the two were separate); it is not stored, so `asdict` has the two
    switches."""

    divergence: str = "fkl"
    use_slot: bool = True
    use_step: bool = True
    hass_objective: bool = True  # HASS's top-K loss at every distilled position
    hass_alignment: bool = True  # HASS's unrolled steps on the drafter's own tokens
    hass: InitVar[bool | None] = None

    def __post_init__(self, hass: bool | None) -> None:
        if hass is not None:
            object.__setattr__(self, "hass_objective", bool(hass))
            object.__setattr__(self, "hass_alignment", bool(hass))
        if self.divergence not in OBJECTIVES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(OBJECTIVES)}")

    @property
    def variant(self) -> str:
        """Directory name: "drafter" for the default, else e.g. "drafter-rkl-no-step" ("no-hass" = both HASS parts
        off, "no-hass-objective" / "no-hass-alignment" = one of them)."""
        default = TrainSpec()
        parts = [] if self.divergence == default.divergence else [self.divergence]
        parts += [flag for flag, on in (("no-slot", self.use_slot), ("no-step", self.use_step)) if not on]
        if not (self.hass_objective or self.hass_alignment):
            parts.append("no-hass")
        elif not self.hass_objective:
            parts.append("no-hass-objective")
        elif not self.hass_alignment:
            parts.append("no-hass-alignment")
        return "-".join([DEFAULT_DIR, *parts])


PLAIN = TrainSpec(use_slot=False, use_step=False, hass=False)  # a plain distilled drafter of the same size
ABLATIONS = (TrainSpec(), PLAIN, TrainSpec(use_slot=False), TrainSpec(use_step=False), TrainSpec(hass=False))


# -- data ------------------------------------------------------------------------------------------

@dataclass
class DistillData:
    users: list[int]
    sequences: list[list[int]]  # prompt + the target's greedy list (ends with EOS)
    rec: list[int]  # index of REC in each sequence
    teacher: list[torch.Tensor]  # float16 [len - 1 - rec, vocab]: target log p after each list-region token,
    #                              renormalised over the allowed tokens (-inf elsewhere)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> DistillData:
        return cls(**torch.load(path, weights_only=True))


@torch.no_grad()
def causal_logits(model: Transformer, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The target's teacher-forced logits [B, T, vocab] for right-padded sequences."""
    bsz, t = tokens.shape
    cache = KVCache(model.args, bsz, t)
    positions, mask = causal_inputs(lengths, t)
    return model(tokens, positions, cache, torch.arange(bsz), positions, mask)


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out, torch.tensor([len(s) for s in seqs])


def allowed_masks(constraint: ListConstraint, states: list[ListState], vocab: int) -> torch.Tensor:
    mask = torch.zeros(len(states), vocab, dtype=torch.bool)
    for i, st in enumerate(states):
        mask[i, torch.as_tensor(constraint.allowed(st), dtype=torch.long)] = True
    return mask


def list_states(constraint: ListConstraint, seq: list[int], rec: int) -> list[ListState]:
    """Grammar state after seq[:rec + 1], seq[:rec + 2], ..., seq[:-1] (each list-region prediction)."""
    state = constraint.start(seq[: rec + 1])
    states = [state]
    for tok in seq[rec + 1: -1]:
        nxt = constraint.advance(state, tok)
        assert nxt is not None
        state = nxt
        states.append(state)
    return states


def teacher_logp(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)


@torch.no_grad()
def make_distill_data(arts: Artifacts, target: Transformer, n_windows: int, seed: int = 0,
                      batch: int = 64, progress: bool = True) -> DistillData:
    """Prompts cut at random points of non-evaluation users' training histories + target greedy lists."""
    rng = np.random.default_rng(seed)
    prof = arts.profile
    pairs = [(u, t) for u, seq in enumerate(arts.split.train) if not is_eval_user(u) for t in range(1, len(seq) + 1)]
    picks = rng.choice(len(pairs), size=min(n_windows, len(pairs)), replace=False)
    windows = sorted(pairs[i] for i in picks)
    constraint = arts.constraint()
    vocab = arts.sids.vocab.size
    data = DistillData([], [], [], [])
    for lo in tqdm(range(0, len(windows), batch), desc="distill data", disable=not progress, unit="batch"):
        chunk = windows[lo: lo + batch]
        prompts = [encode_prompt(arts.sids, arts.split.train[u][max(0, t - prof.max_history): t]) for u, t in chunk]
        outs = decode(target, constraint, prompts)
        seqs = [p + d.tokens for p, d in zip(prompts, outs, strict=True)]
        tokens, lengths = pad(seqs)
        logits = causal_logits(target, tokens, lengths)
        for i, ((u, _), seq) in enumerate(zip(chunk, seqs, strict=True)):
            rec = seq.index(REC)
            states = list_states(constraint, seq, rec)
            allowed = allowed_masks(constraint, states, vocab)
            data.users.append(u)
            data.sequences.append(seq)
            data.rec.append(rec)
            data.teacher.append(teacher_logp(logits[i, rec: len(seq) - 1], allowed).half())
    return data


def distill_data(arts: Artifacts, profile: DrafterProfile, target: Transformer | None = None, seed: int = 0,
                 progress: bool = True) -> DistillData:
    """Cached under <artifacts>/drafter-data/; shared by every drafter variant of the profile."""
    path = arts.directory / DATA_DIR / f"greedy-{profile.windows}-{seed}.pt"
    if path.is_file():
        return DistillData.load(path)
    target = target or Transformer.from_pretrained(arts.target_dir)
    data = make_distill_data(arts, target, profile.windows, seed, progress=progress)
    data.save(path)
    return data


# -- losses ----------------------------------------------------------------------------------------

def _softmin_01(h: torch.Tensor, eps: float) -> torch.Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps) for every i, with the 0/1 cost C (0 on the diagonal): the kernel is
    exp(-1/eps) everywhere plus (1 - exp(-1/eps)) on the diagonal, so this is O(V) per row, not O(V^2)."""
    lse = torch.logsumexp(h, dim=-1, keepdim=True)
    return -eps * torch.logaddexp(lse - 1.0 / eps, math.log1p(-math.exp(-1.0 / eps)) + h)


def _entropic_ot(la: torch.Tensor, lb: torch.Tensor, allowed: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) per row (0/1 cost), by log-space Sinkhorn on the dual
    potentials f, g; the value is the dual <a, f> + <b, g>. la, lb: masked log-weights (-inf off `allowed`)."""
    zero = torch.zeros((), dtype=la.dtype)
    a, b = torch.where(allowed, la.exp(), zero), torch.where(allowed, lb.exp(), zero)
    g = torch.zeros_like(lb)
    f = _softmin_01(lb + g / eps, eps)
    for _ in range(iters):
        g = _softmin_01(la + f / eps, eps)
        f = _softmin_01(lb + g / eps, eps)
    return (a * torch.where(allowed, f, zero)).sum(-1) + (b * torch.where(allowed, g, zero)).sum(-1)


def sinkhorn(lp: torch.Tensor, lq: torch.Tensor, allowed: torch.Tensor, eps: float = SINKHORN_EPS,
             iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """SinKD's Sinkhorn distance per row, debiased: S = OT_eps(p, q) - (OT_eps(p, p) + OT_eps(q, q)) / 2.

    Tokens have no natural metric, so the ground cost is 0/1 (0 on the diagonal, 1 between different allowed
    tokens). With this cost the exact OT distance equals the total variation distance (move only the excess mass,
    at cost 1 per unit); the entropic version smooths it: it gives gradient where TVD's is piecewise constant and
    tends to TVD as eps -> 0. The debiasing (Feydy et al. 2019) makes it 0 at q = p and >= 0 (the kernel
    exp(-C/eps) is positive definite); the three terms run the same iterations, so it is exactly 0 at q = p.
    Differentiable through `iters` unrolled log-space iterations."""
    la = lp.masked_fill(~allowed, float("-inf"))
    lb = lq.masked_fill(~allowed, float("-inf"))
    pq = _entropic_ot(la, lb, allowed, eps, iters)
    with torch.no_grad():  # constant in q
        pp = _entropic_ot(la, la, allowed, eps, iters)
    return pq - 0.5 * pp - 0.5 * _entropic_ot(lb, lb, allowed, eps, iters)


def bdkd(lp: torch.Tensor, lq: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """BD-KD per row: w_f KL(p || q) + w_r KL(q || p) with w_f = H(q) / (H(p) + H(q)), w_r = H(p) / (H(p) + H(q))
    (entropies over the allowed tokens, weights detached; equal weights when both are one-hot)."""
    zero = torch.zeros((), dtype=lq.dtype)
    p, q = torch.where(allowed, lp.exp(), zero), torch.where(allowed, lq.exp(), zero)
    lp0, lq0 = torch.where(allowed, lp, zero), torch.where(allowed, lq, zero)
    with torch.no_grad():
        hp, hq = -(p * lp0).sum(-1), -(q * lq0).sum(-1)
        total = hp + hq
        w_f = torch.where(total > 1e-12, hq / total.clamp_min(1e-12), torch.full_like(total, 0.5))
    return w_f * (p * (lp0 - lq0)).sum(-1) + (1 - w_f) * (q * (lq0 - lp0)).sum(-1)


def pld(lp: torch.Tensor, lq: torch.Tensor, allowed: torch.Tensor, k: int = PLD_TOP_K) -> torch.Tensor:
    """PLD per row: the Plackett-Luce negative log-likelihood, under the drafter's scores log q, of the target's
    order of its top-K allowed tokens (K capped at the allowed count): sum over ranks i of
    -log q[pi_i] + logsumexp_{j >= i} log q[pi_j]. >= 0; 0 only in the limit where q separates the K in the
    target's order; tokens outside the target's top K get no gradient from it."""
    la = lp.masked_fill(~allowed, float("-inf"))
    vals, idx = la.topk(min(k, la.shape[-1]), dim=-1)
    ok = torch.isfinite(vals)
    s = lq.gather(-1, idx).clamp_min(-1e4).masked_fill(~ok, -1e4)  # finite: logcumsumexp of -inf has nan grads
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)  # logsumexp over ranks j >= i
    return torch.where(ok, tail - s, torch.zeros((), dtype=lq.dtype)).sum(-1)


def divergence(kind: str, lp: torch.Tensor, lq: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per-row divergence (or, for RANKING_LOSSES, list-wise loss) between target p and drafter q, both given as
    masked log-probs [N, V]."""
    if kind == "sinkhorn":
        return sinkhorn(lp, lq, allowed)
    if kind == "bdkd":
        return bdkd(lp, lq, allowed)
    if kind == "pld":
        return pld(lp, lq, allowed)
    zero = torch.zeros((), dtype=lq.dtype)
    p = torch.where(allowed, lp.exp(), zero)
    q = torch.where(allowed, lq.exp(), zero)
    lp0 = torch.where(allowed, lp, zero)
    lq0 = torch.where(allowed, lq, zero)
    if kind == "fkl":
        return (p * (lp0 - lq0)).sum(-1)
    if kind == "rkl":
        return (q * (lq0 - lp0)).sum(-1)
    if kind == "js":
        lm = torch.where(allowed, torch.log((p + q).clamp_min(1e-30) / 2), zero)
        return 0.5 * (p * (lp0 - lm)).sum(-1) + 0.5 * (q * (lq0 - lm)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def top_k_loss(lp: torch.Tensor, lq: torch.Tensor, k: int) -> torch.Tensor:
    """HASS: cross-entropy to the target's mass restricted to its top K tokens (renormalised), per row.

    K = 1 is the target's argmax as a hard label: greedy verification accepts exactly that token, so q
    learns P(token = argmax p), the acceptance probability tree selection ranks by."""
    vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
    ok = torch.isfinite(vals)
    weights = torch.softmax(vals.masked_fill(~ok, -math.inf), dim=-1)
    picked = lq.gather(-1, idx)
    return -torch.where(ok, weights * picked.clamp_min(-1e4), torch.zeros((), dtype=lq.dtype)).sum(-1)


def position_loss(spec: TrainSpec, prof: DrafterProfile, logits: torch.Tensor,
                  lp: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed loss, positions) over rows of logits/lp [N, V] whose grammar allows more than one token."""
    allowed = torch.isfinite(lp)
    keep = allowed.sum(-1) > 1
    if not keep.any():
        return logits.sum() * 0.0, 0
    logits, lp, allowed = logits[keep], lp[keep].float(), allowed[keep]
    lq = F.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    loss = divergence(spec.divergence, lp, lq, allowed)
    if spec.hass_objective:
        loss = loss + prof.top_k_weight * top_k_loss(lp, lq, prof.top_k)
    return loss.sum(), int(keep.sum())


class DistillLoss:
    """loss_fn(rng) for training.loop.train: teacher-forced distillation + HASS unrolling."""

    def __init__(self, model: PadDrafter, target: Transformer, data: DistillData, constraint: ListConstraint,
                 spec: TrainSpec, prof: DrafterProfile):
        self.model, self.target, self.data = model, target, data
        self.constraint, self.spec, self.prof = constraint, spec, prof
        self.vocab = model.config.vocab.size
        self._states: dict[int, list[ListState]] = {}

    def __call__(self, rng: np.random.Generator) -> torch.Tensor:
        picks = rng.integers(len(self.data.sequences), size=self.prof.batch_size)
        loss, n = self.teacher_forced(picks)
        if self.spec.hass_alignment and self.prof.unroll > 0:  # every position weighs the same, drafted or not (HASS)
            more, m = self.unrolled(picks[: self.prof.unroll_batch], rng)
            loss, n = loss + self.prof.unroll_weight * more, n + m
        return loss / max(n, 1)

    def teacher_forced(self, picks: np.ndarray) -> tuple[torch.Tensor, int]:
        seqs = [self.data.sequences[i] for i in picks]
        tokens, lengths = pad(seqs)
        logits = self.model.sequence_logits(tokens, torch.zeros_like(tokens), lengths)
        rows, cols = [], []
        for b, i in enumerate(picks):
            rec, n = self.data.rec[i], len(self.data.sequences[i])
            rows += [b] * (n - 1 - rec)
            cols += list(range(rec, n - 1))
        lp = torch.cat([self.data.teacher[i] for i in picks])
        return position_loss(self.spec, self.prof, logits[rows, cols], lp)

    def states(self, i: int) -> list[ListState]:
        if i not in self._states:
            self._states[i] = list_states(self.constraint, self.data.sequences[i], self.data.rec[i])
        return self._states[i]

    def unrolled(self, picks: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Draft `unroll` tokens on the drafter's own samples after a random cut; distil after each."""
        k = self.prof.unroll
        prefixes, states = [], []
        for i in picks:
            seq, rec = self.data.sequences[i], self.data.rec[i]
            c = int(rng.integers(rec + 1, len(seq)))  # committed tokens: seq[:c]; the drafter goes on from there
            prefixes.append(list(seq[:c]))
            states.append(self.states(int(i))[c - 1 - rec])
        drafted: list[list[int]] = [[] for _ in picks]
        after: list[list[ListState]] = [[] for _ in picks]
        with torch.no_grad():
            for j in range(k):
                live = [b for b in range(len(picks)) if not states[b].finished]
                if not live:
                    break
                seqs = [prefixes[b] + drafted[b] for b in live]
                tokens, lengths = pad(seqs)
                steps = torch.zeros_like(tokens)
                for r, b in enumerate(live):
                    steps[r, len(prefixes[b]): len(seqs[r])] = torch.arange(1, j + 1)
                logits = self.model.sequence_logits(tokens, steps, lengths)
                last = logits[torch.arange(len(live)), lengths - 1]
                allowed = allowed_masks(self.constraint, [states[b] for b in live], self.vocab)
                logits_ok = last.float().masked_fill(~allowed, float("-inf"))
                if self.prof.unroll_sample:
                    toks = torch.multinomial(F.softmax(logits_ok, dim=-1), 1)[:, 0].tolist()
                else:
                    toks = logits_ok.argmax(-1).tolist()
                for b, tok in zip(live, toks, strict=True):
                    nxt = self.constraint.advance(states[b], tok)
                    assert nxt is not None
                    drafted[b].append(tok)
                    states[b] = nxt
                    after[b].append(nxt)
        # positions whose input is a drafted token and whose next token is still open
        use = [b for b in range(len(picks)) if any(not s.finished for s in after[b])]
        if not use:
            return self.model.slot_scale * 0.0, 0
        seqs = [prefixes[b] + drafted[b] for b in use]
        tokens, lengths = pad(seqs)
        steps = torch.zeros_like(tokens)
        rows, cols, st = [], [], []
        for r, b in enumerate(use):
            c = len(prefixes[b])
            steps[r, c: c + len(drafted[b])] = torch.arange(1, len(drafted[b]) + 1)
            for j, s in enumerate(after[b]):
                if not s.finished:
                    rows.append(r)
                    cols.append(c + j)
                    st.append(s)
        teacher = causal_logits(self.target, tokens, lengths)[rows, cols]
        lp = teacher_logp(teacher, allowed_masks(self.constraint, st, self.vocab))
        logits = self.model.sequence_logits(tokens, steps, lengths)[rows, cols]
        return position_loss(self.spec, self.prof, logits, lp)


# -- training --------------------------------------------------------------------------------------

def drafter_config(arts: Artifacts, prof: DrafterProfile, spec: TrainSpec) -> DrafterConfig:
    return DrafterConfig(tuple(arts.sids.vocab.level_sizes), dim=prof.dim, n_layers=prof.layers, n_heads=prof.heads,
                         intermediate=prof.intermediate, max_len=arts.profile.max_len, use_slot=spec.use_slot,
                         use_step=spec.use_step)


def drafter_params(arts: Artifacts, prof: DrafterProfile, spec: TrainSpec) -> int:
    """Parameters a drafter of this profile would have on these artifacts' vocabulary (built on the meta device)."""
    with torch.device("meta"):
        return PadDrafter(drafter_config(arts, prof, spec)).n_params()


def fit_profile(prof: DrafterProfile, arts: Artifacts, spec: TrainSpec, n_target: int) -> DrafterProfile:
    """The profile, or a narrower one (width shrunk in steps of twice the head count, so a head's width stays even as
    rotary embeddings need, the MLP in proportion) whose drafter stays within 1/10 of the target's parameters: a
    larger vocabulary grows the drafter's embeddings faster than a fixed profile allows. ValueError, before any work,
    when even the narrowest does not fit."""
    fitted = prof
    step = 2 * prof.heads
    while drafter_params(arts, fitted, spec) * 10 > n_target:
        dim = (fitted.dim - 1) // step * step
        if dim < step:
            raise ValueError(f"no drafter of {fitted.layers} layers fits within 1/10 of the target's {n_target} "
                             f"parameters on a vocabulary of {arts.sids.vocab.size} tokens: train a larger target "
                             "profile, or a drafter profile with fewer layers")
        fitted = replace(fitted, dim=dim, intermediate=max(fitted.heads, prof.intermediate * dim // prof.dim))
    if fitted is not prof:
        log.warning("drafter profile %s (%d parameters) is over 1/10 of the target's %d: training it %d wide "
                    "(%d parameters) instead", prof.name, drafter_params(arts, prof, spec), n_target, fitted.dim,
                    drafter_params(arts, fitted, spec))
    return fitted


def train_drafter(arts: Artifacts, spec: TrainSpec = TrainSpec(), profile: DrafterProfile | None = None,
                  seed: int = 0, progress: bool = True, steps: int | None = None, name: str | None = None,
                  data_seed: int | None = None) -> Path:
    """Train one variant into <artifacts>/<name or spec.variant>/ (resumable from <name>.train/). data_seed (default:
    seed) picks the cached distillation data, so seeds of an ablation can share one data set."""
    prof = profile or drafter_profile(arts.profile.name)
    if steps is not None:
        prof = replace(prof, steps=steps)
    target = Transformer.from_pretrained(arts.target_dir)
    for p in target.parameters():
        p.requires_grad_(False)
    n_target = sum(p.numel() for p in target.parameters())
    prof = fit_profile(prof, arts, spec, n_target)  # before the distillation data: never a refusal after the work
    data = distill_data(arts, prof, target, seed=seed if data_seed is None else data_seed, progress=progress)
    torch.manual_seed(seed)
    model = PadDrafter(drafter_config(arts, prof, spec))
    loss_fn = DistillLoss(model, target, data, arts.constraint(), spec, prof)
    name = name or spec.variant
    out = arts.directory / name
    work_dir = arts.directory / f"{name}.train"
    losses = train(model, loss_fn, prof.steps, prof.lr, work_dir, seed=seed, desc=f"{name}[{prof.name}]",
                   progress=progress)
    model.save(out)
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # empty once training finished (the loop deletes its checkpoint)
    meta = {"spec": asdict(spec), "profile": asdict(prof), "seed": seed,
            "data_seed": seed if data_seed is None else data_seed, "params": model.n_params(),
            "target_params": n_target, "final_loss": float(np.mean(losses[-20:])) if losses else None}
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def trained(arts: Artifacts, spec: TrainSpec = TrainSpec()) -> bool:
    return (arts.directory / spec.variant / "config.json").is_file()
