"""Offline acceptance: tau of a drafter against the target's own greedy output, without any service.

For each evaluation user the target's constrained greedy list is the truth. A verification of a tree
after the committed prefix accepts the longest tree path that is a prefix of the truth's remainder and
adds the target's bonus token (none once EOS is accepted), so one round commits min(accepted + 1,
remaining) tokens. We replay the speculation loop over the truth for every budget:

    tau      = committed tokens / rounds                     (the usual tau, bonus included)
    tau_open = committed tokens the grammar did not force / rounds

Chains of depth d use Budget(8, 8, top_k=1) cut to d nodes; trees of n nodes use
Budget(tree_depth, 64, top_k) cut to n nodes (the tree's first n nodes are its best n-node tree).
Per item slot, rounds are grouped by the slot of the first token the round had to guess (its first
unforced token): code level L0..L{n-1}, SEP, EOS, or "end" when only forced tokens were left.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from specrec.artifacts import Artifacts
from specrec.decoding.plain import decode
from specrec.drafting.base import Budget, Drafter, DraftTree
from specrec.models.llama import Transformer
from specrec.semantic_ids.constraint import ListConstraint

EVAL_EVERY = 5  # users u with u % EVAL_EVERY == 0 are held out of drafter training and pools


def is_eval_user(user: int) -> bool:
    return user % EVAL_EVERY == 0


def eval_users(arts: Artifacts, limit: int | None = None) -> list[int]:
    users = [u for u in range(arts.data.n_users) if is_eval_user(u) and len(arts.split.train[u])]
    return users[:limit] if limit else users


@dataclass(frozen=True)
class EvalConfig:
    chain_depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    tree_sizes: tuple[int, ...] = (8, 16, 32, 64)
    tree_depth: int = 8
    top_k: int = 8

    @property
    def columns(self) -> list[str]:
        return [f"chain {d}" for d in self.chain_depths] + [f"tree {n}" for n in self.tree_sizes]


@dataclass
class Truth:
    prompt: list[int]
    tokens: list[int]  # the target's greedy continuation, ending with EOS
    forced: list[bool]  # the grammar allowed only tokens[t] at t
    slots: list[str]  # slot of the first unforced token at or after t


@dataclass
class Report:
    name: str
    committed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    open_committed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rounds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    slot_committed: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    slot_rounds: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def tau(self, col: str) -> float:
        return self.committed[col] / max(1, self.rounds[col])

    def tau_open(self, col: str) -> float:
        return self.open_committed[col] / max(1, self.rounds[col])

    def tau_slot(self, slot: str, col: str) -> float | None:
        r = self.slot_rounds[(slot, col)]
        return self.slot_committed[(slot, col)] / r if r else None


def slot_name(constraint: ListConstraint, token: int) -> str:
    vocab = constraint.trie.vocab
    slot = vocab.slot_of(token)
    if slot < vocab.n_levels:
        return f"L{slot}"
    return "SEP" if slot == vocab.n_levels else vocab.describe(token)


@torch.inference_mode()
def target_truths(arts: Artifacts, target: Transformer, users: list[int], batch: int = 64) -> list[Truth]:
    constraint = arts.constraint()
    out = []
    for lo in range(0, len(users), batch):
        prompts = [arts.prompt(u) for u in users[lo: lo + batch]]
        for prompt, dec in zip(prompts, decode(target, constraint, prompts), strict=True):
            state = constraint.start(prompt)
            forced = []
            for tok in dec.tokens:
                forced.append(constraint.forced(state) is not None)
                nxt = constraint.advance(state, tok)
                assert nxt is not None
                state = nxt
            slots, nxt_slot = [], "end"
            for tok, f in zip(reversed(dec.tokens), reversed(forced), strict=True):
                if not f:
                    nxt_slot = slot_name(constraint, tok)
                slots.append(nxt_slot)
            out.append(Truth(prompt, dec.tokens, forced, slots[::-1]))
    return out


def matches(trees: list[DraftTree], truth: Truth, sizes: list[int]) -> dict[int, list[int]]:
    """Accepted length at every position t for each tree size n (the tree's first n nodes).

    Nodes are parents-first and siblings differ, so in the first n nodes the accepted path is the full
    tree's accepted path cut at its first node numbered n or more."""
    out: dict[int, list[int]] = {n: [] for n in sizes}
    for t, tree in enumerate(trees):
        path = tree.match(truth.tokens[t:])
        for n in sizes:
            k = 0
            while k < len(path) and path[k] < n:
                k += 1
            out[n].append(k)
    return out


def replay(report: Report, col: str, accepted: list[int], truth: Truth) -> None:
    """The speculation loop over one truth: each round commits accepted + bonus (up to EOS)."""
    t, n = 0, len(truth.tokens)
    while t < n:
        step = min(accepted[t] + 1, n - t)
        slot = truth.slots[t]
        report.rounds[col] += 1
        report.committed[col] += step
        report.open_committed[col] += sum(1 for f in truth.forced[t: t + step] if not f)
        report.slot_rounds[(slot, col)] += 1
        report.slot_committed[(slot, col)] += step
        t += step


def evaluate(drafter: Drafter, truths: list[Truth], constraint: ListConstraint,
             cfg: EvalConfig = EvalConfig(), name: str | None = None, progress: bool = False) -> Report:
    report = Report(name or drafter.name)
    chain_budget = Budget(max(cfg.chain_depths), max(cfg.chain_depths), 1)
    tree_budget = Budget(cfg.tree_depth, max(cfg.tree_sizes), cfg.top_k)
    for truth in tqdm(truths, desc=f"eval {report.name}", disable=not progress, unit="user"):
        chains = drafter.trees_along(truth.prompt, constraint, truth.tokens, chain_budget)
        acc = matches(chains, truth, list(cfg.chain_depths))
        for d in cfg.chain_depths:
            replay(report, f"chain {d}", acc[d], truth)
        trees = drafter.trees_along(truth.prompt, constraint, truth.tokens, tree_budget)
        acc = matches(trees, truth, list(cfg.tree_sizes))
        for n in cfg.tree_sizes:
            replay(report, f"tree {n}", acc[n], truth)
    return report


def markdown(reports: list[Report], cfg: EvalConfig = EvalConfig()) -> str:
    cols = cfg.columns
    head = "| drafter | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = ["**tau** (tokens committed per verification, bonus included)\n", head]
    lines += [f"| {r.name} | " + " | ".join(f"{r.tau(c):.2f}" for c in cols) + " |\n" for r in reports]
    lines += ["\n**tau_open** (committed tokens the grammar did not force, per verification)\n", head]
    lines += [f"| {r.name} | " + " | ".join(f"{r.tau_open(c):.2f}" for c in cols) + " |\n" for r in reports]
    slots = sorted({s for r in reports for s, _ in r.slot_rounds}, key=_slot_order)
    lines += ["\n**tau per item slot** (rounds grouped by the slot of their first unforced token)\n",
              "| drafter | slot | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"]
    for r in reports:
        for s in slots:
            vals = [r.tau_slot(s, c) for c in cols]
            if any(v is not None for v in vals):
                lines.append(f"| {r.name} | {s} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
                             + " |\n")
    return "".join(lines)


def _slot_order(slot: str) -> tuple[int, str]:
    if slot.startswith("L") and slot[1:].isdigit():
        return (0, f"{int(slot[1:]):03d}")
    return (1, slot)
