"""EAGLE-2 dynamic token trees under the list grammar.

Expansion (per tree): the root's allowed children score log q. Each round runs ONE batched drafter
forward over the frontier nodes of every tree (tree attention: a node sees its row's committed prefix,
its ancestors and itself), gives each expanded node its top_k allowed children scored
parent score + log q, and keeps the round's global top_k children as the next frontier.

Forced tokens (the grammar allows exactly one) are inserted without a model call: log q = 0, so they
keep their parent's score. They still pass through the next forward with the node below them, since
their children need the drafter's output there.

Value: a node is ranked by its value, the cumulative log q of its path, or, given a calibration per depth
(`TreeBuilder(value_of=...)`), the log of the probability that verification accepts a path of that q at that
depth (never more than its parent's). The drafter's q is far from that: on the bench profile a path of q ~ 0.1 is
accepted 2% of the time at depth 1 and 65% at depth 12, so by q alone deep nodes lose their places to shallow
long shots. Nodes of one depth keep their order by q either way; what changes is which depths the tree spends on.
The output tree's logprobs are value increments (their sums the values); `DraftTree.q_logprobs` keeps log q.

Confidence stop: a candidate whose value falls below log(budget.min_path_prob) is dropped (and so never
expanded): the tree goes deep where the drafter is sure and stays shallow elsewhere.

Selection: the best max_nodes candidates by value. Values never rise along a path, and ties go to the
shallower node, so the kept set is connected and comes out parents first; the output order is the priority
order, so `DraftTree.prefix(n)` is the best n-node tree. A kept node whose only legal child is forced gets that
child too (it costs the target nothing to accept).

Log q is the drafter's distribution renormalised over the grammar's allowed tokens, the same mask the
target applies.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specrec.calibration import Calibration, DepthCalibration
from specrec.drafting.base import Budget, DraftTree
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import EOS, SEP

# (tokens, steps, positions, rows, slots, mask) -> logits [B, T, vocab]; see PadDrafter.forward.
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (path log q [n], path lengths [n]) -> node values [n] (e.g. DepthCalibration.log_accepted)
ValueFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Node:
    """A candidate tree node. depth 0 = child of the root; the root itself has depth -1."""

    __slots__ = ("token", "parent", "logprob", "score", "value", "depth", "state", "allowed", "slot", "anc", "out",
                 "expanded", "seq")

    def __init__(self, token: int, parent: Node | None, logprob: float, score: float, depth: int, seq: int,
                 value: float):
        self.token = token
        self.parent = parent
        self.logprob = logprob
        self.score = score  # cumulative log q of the path
        self.value = value  # what the node is ranked by (see the module doc)
        self.depth = depth
        self.seq = seq  # creation order, the last tie-break
        self.state: ListState | None = None
        self.allowed: np.ndarray | None = None  # the grammar's allowed next tokens, once asked
        self.slot = -1  # cache slot once fed to the drafter
        self.anc: list[int] = []  # cache slots this node attends besides the prefix (ancestors, extra)
        self.out: torch.Tensor | None = None  # masked log q [vocab] after this node, once expanded
        self.expanded = False  # children were created (by the model or as a forced token)

    def path(self) -> tuple[int, ...]:
        out: list[int] = []
        node: Node | None = self
        while node is not None and node.depth >= 0:
            out.append(node.token)
            node = node.parent
        return tuple(reversed(out))


@dataclass
class TreeRoot:
    """Where a tree hangs: the last committed token of one cache row."""

    row: int
    prefix: int  # the tree attends cache slots [0, prefix) of its row
    position: int  # position of depth-0 nodes (= number of committed tokens)
    state: ListState  # grammar state after the committed tokens
    logprobs: torch.Tensor | None  # [vocab] drafter log q after the last committed token (None: not needed)
    extra_slots: list[int] = field(default_factory=list)  # committed tokens cached outside [0, prefix)


@dataclass
class BuiltTree:
    tree: DraftTree
    fed: dict[tuple[int, ...], int]  # token path from the root -> cache slot holding that node
    outputs: dict[tuple[int, ...], torch.Tensor]  # token path -> masked log q after it (expanded nodes)


class Scratch:
    """Hands out cache slots for draft nodes, per row, from a start slot up to a limit (the cache's
    max_len); the slot after the last one handed out stays free for padding."""

    def __init__(self, start: dict[int, int], limit: int):
        self.next = dict(start)
        self.limit = limit

    def alloc(self, row: int) -> int:
        slot = self.next[row]
        if slot + 1 >= self.limit:
            raise OverflowError(f"draft tree needs more than the {self.limit} cache slots of row {row}")
        self.next[row] = slot + 1
        return slot


class CandidateTree:
    """Candidates grown below one root, with grammar states computed on demand."""

    def __init__(self, root: TreeRoot, constraint: ListConstraint, counter: list[int]):
        self.spec = root
        self.constraint = constraint
        self.counter = counter
        self.root = Node(-1, None, 0.0, 0.0, -1, self._seq(), 0.0)
        self.root.state = root.state
        self.root.anc = list(root.extra_slots)
        self.root.out = None if root.logprobs is None else masked(root.logprobs, self.allowed(self.root))
        self.nodes: list[Node] = []

    def _seq(self) -> int:
        self.counter[0] += 1
        return self.counter[0]

    def state(self, node: Node) -> ListState:
        if node.state is None:
            assert node.parent is not None
            node.state = child_state(self.constraint, self.state(node.parent), node.token)
        return node.state

    def allowed(self, node: Node) -> np.ndarray:
        if node.allowed is None:
            node.allowed = self.constraint.allowed(self.state(node))
        return node.allowed

    def add(self, parent: Node, token: int, logprob: float, value: float | None = None) -> Node:
        """A child; `value` None: its parent's value + log q (its path's log q in a tree ranked by q; a forced child,
        log q = 0, is accepted whenever its parent is and takes the parent's value)."""
        value = parent.value + logprob if value is None else value
        node = Node(token, parent, logprob, parent.score + logprob, parent.depth + 1, self._seq(), value)
        self.nodes.append(node)
        return node

    def forced_child(self, node: Node, max_depth: int) -> Node | None:
        """Insert node's forced child (no model call), if the grammar forces one and depth allows."""
        if node.expanded or node.depth + 1 >= max_depth:
            return None
        allowed = self.allowed(node)
        if len(allowed) != 1:
            return None
        node.expanded = True
        return self.add(node, int(allowed[0]), 0.0)


def child_state(constraint: ListConstraint, state: ListState, token: int) -> ListState:
    """constraint.advance(state, token) for a token taken from constraint.allowed(state), without
    deriving that allowed set a second time (the hot path of tree building)."""
    if token == EOS:
        return state.ended()
    if token == SEP:
        return state.item_written(constraint.trie.root)
    child = constraint.trie.child(state.node, token)
    assert child is not None, "a draft node left the grammar"
    return ListState(child, state.n_done, state.excluded, state.generated)


def masked(logprobs: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """Log q renormalised over `allowed` (-inf elsewhere). logprobs/logits: [vocab]."""
    keep = torch.full_like(logprobs, -math.inf)
    idx = torch.as_tensor(allowed, dtype=torch.long)
    keep[idx] = logprobs[idx]
    return torch.log_softmax(keep, dim=-1) if len(idx) else keep


def build_trees(step: StepFn | None, constraint: ListConstraint, roots: list[TreeRoot], budget: Budget,
                scratch: Scratch, want_probs: bool = False, max_step: int = 16,
                value_of: ValueFn | None = None) -> list[BuiltTree]:
    """One dynamic tree per root, expanded together (one drafter forward per round)."""
    builder = TreeBuilder(step, constraint, roots, budget, scratch, max_step, value_of)
    builder.run()
    return builder.results(want_probs)


class TreeBuilder:
    """build_trees one round at a time, so that drafting ahead can stop between rounds (the commit has
    arrived), keep only the tree that came true and finish it later."""

    def __init__(self, step: StepFn | None, constraint: ListConstraint, roots: list[TreeRoot], budget: Budget,
                 scratch: Scratch, max_step: int = 16, value_of: ValueFn | None = None):
        self.step = step
        self.value_of = value_of
        self.constraint = constraint
        self.budget = budget.validated()
        self.scratch = scratch
        self.max_step = max_step
        counter = [0]
        self.trees = [CandidateTree(r, constraint, counter) for r in roots]
        self.frontiers: list[list[Node]] = [[t.root] for t in self.trees]
        self.rounds = 0
        self.done = self.budget.empty

    def run(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Expand rounds until the trees are complete or stop(); returns whether they are complete."""
        while not self.done and not stop():
            self.expand_round()
        return self.done

    def keep_only(self, index: int) -> None:
        """Stop growing every tree but one (its frontier stays as it was)."""
        self.frontiers = [f if i == index else [] for i, f in enumerate(self.frontiers)]

    def expand_round(self) -> None:
        budget = self.budget
        if self.rounds >= budget.depth:
            self.done = True
            return
        self.rounds += 1
        # 1. follow forced tokens down from each frontier node to the node whose children we need
        to_expand: list[tuple[CandidateTree, Node]] = []
        for tree, frontier in zip(self.trees, self.frontiers, strict=True):
            for node in frontier:
                while (child := tree.forced_child(node, budget.depth)) is not None:
                    node = child
                if node.depth + 1 < budget.depth and len(tree.allowed(node)):
                    to_expand.append((tree, node))
        if not to_expand:
            self.done = True
            return
        # 2. one forward over every not-yet-fed node on the way to a node we expand
        for _, node in to_expand:
            if node.depth < 0 and node.out is None:
                raise ValueError("a root that is not forced needs the drafter's log q (TreeRoot.logprobs)")
        _feed(self.step, [(t, n) for t, n in to_expand if n.out is None], self.scratch, self.max_step)
        # 3. top_k allowed children of every expanded node; the round's best top_k per tree go on
        outs = torch.stack([node.out for _, node in to_expand])  # type: ignore[misc]  # [m, vocab], -inf = banned
        vals, toks = torch.topk(outs, min(budget.top_k, outs.shape[-1]), dim=-1)
        new_children: dict[int, list[Node]] = {}
        floor = budget.min_logprob
        cands = [(tree, node, v, tok) for (tree, node), row_vals, row_toks in
                 zip(to_expand, vals.tolist(), toks.tolist(), strict=True)
                 for v, tok in zip(row_vals, row_toks, strict=True) if v > -math.inf]
        values = self._values(cands)
        for (_, node) in to_expand:
            node.expanded = True
        for (tree, node, v, tok), value in zip(cands, values, strict=True):
            if value >= floor:  # the confidence stop: below it, never kept
                new_children.setdefault(id(tree), []).append(tree.add(node, tok, v, value))
        self.frontiers = []
        for tree in self.trees:
            kids = new_children.get(id(tree), [])
            kids.sort(key=lambda n: (-n.value, n.seq))
            self.frontiers.append(kids[: budget.top_k])

    def _values(self, cands: list[tuple[CandidateTree, Node, float, int]]) -> list[float]:
        """Each candidate child's value: its path's log q, or what value_of makes of it (capped by its parent's)."""
        scores = [node.score + v for _, node, v, _ in cands]
        if self.value_of is None or not cands:
            return scores
        values = self.value_of(np.asarray(scores), np.asarray([node.depth + 2 for _, node, _, _ in cands]))
        return [min(float(x), node.value) for x, (_, node, _, _) in zip(values, cands, strict=True)]

    def results(self, want_probs: bool = False) -> list[BuiltTree]:
        return [self.result(i, want_probs) for i in range(len(self.trees))]

    def result(self, index: int, want_probs: bool = False) -> BuiltTree:
        """Tree `index` alone (a guess drafted ahead that came true: selecting its siblings too cost ~0.3 ms)."""
        if self.budget.empty:
            return BuiltTree(DraftTree(vocab_size=self.constraint.trie.vocab.size), {}, {})
        return select(self.trees[index], self.budget, want_probs, self.value_of is not None)


def _feed(step: StepFn | None, targets: list[tuple[CandidateTree, Node]], scratch: Scratch, max_step: int) -> None:
    """Run the drafter on every unfed node up to each target; store log q at the targets."""
    if not targets:
        return
    if step is None:
        raise ValueError("this tree needs drafter outputs but no drafter step was given")
    per_row: dict[int, list[tuple[CandidateTree, Node]]] = {}
    for tree, target in targets:
        chain, node = [], target
        while node.slot < 0 and node.depth >= 0:
            chain.append(node)
            node = node.parent  # type: ignore[assignment]
        for n in reversed(chain):
            n.slot = scratch.alloc(tree.spec.row)
            parent = n.parent
            assert parent is not None
            n.anc = parent.anc + ([parent.slot] if parent.depth >= 0 else [])
            per_row.setdefault(tree.spec.row, []).append((tree, n))
    rows = sorted(per_row)
    t = max(len(per_row[r]) for r in rows)
    pad = {r: scratch.next[r] for r in rows}  # a free slot per row: padding writes there, seeing only itself
    span = max(max(pad[r] + 1, *(tree.spec.prefix for tree, _ in per_row[r])) for r in rows)
    bsz = len(rows)
    tokens = np.zeros((bsz, t), dtype=np.int64)
    steps = np.zeros((bsz, t), dtype=np.int64)
    positions = np.zeros((bsz, t), dtype=np.int64)
    slots = np.array([[pad[r]] * t for r in rows], dtype=np.int64)
    mask = np.zeros((bsz, t, span), dtype=bool)
    for b, row in enumerate(rows):
        for i, (tree, n) in enumerate(per_row[row]):
            tokens[b, i] = n.token
            steps[b, i] = min(n.depth + 1, max_step)
            positions[b, i] = tree.spec.position + n.depth
            slots[b, i] = n.slot
            mask[b, i, : tree.spec.prefix] = True
            mask[b, i, n.anc] = True
        mask[b, np.arange(t), slots[b]] = True
    with torch.inference_mode():
        logits = step(torch.from_numpy(tokens), torch.from_numpy(steps), torch.from_numpy(positions),
                      torch.as_tensor(rows), torch.from_numpy(slots), torch.from_numpy(mask))
    wanted = {id(n) for _, n in targets}
    picks = [(b, i, tree, n) for b, row in enumerate(rows) for i, (tree, n) in enumerate(per_row[row])
             if id(n) in wanted]
    allowed = np.zeros((len(picks), logits.shape[-1]), dtype=bool)
    for j, (_, _, tree, n) in enumerate(picks):
        allowed[j, tree.allowed(n)] = True
    rows_out = logits[[b for b, _, _, _ in picks], [i for _, i, _, _ in picks]].float()
    outs = torch.log_softmax(rows_out.masked_fill(~torch.from_numpy(allowed), -math.inf), dim=-1)
    for j, (_, _, _, n) in enumerate(picks):
        n.out = outs[j]


def select(tree: CandidateTree, budget: Budget, want_probs: bool, calibrated: bool = False) -> BuiltTree:
    """The best max_nodes candidates (plus forced closure), in priority order."""
    heap = [(-n.value, n.depth, n.seq, n) for n in tree.nodes]
    heapq.heapify(heap)
    taken: list[Node] = []
    index: dict[int, int] = {id(tree.root): -1}
    # The root's forced child, if its expansion was never reached (depth budget), comes first anyway.
    while heap and len(taken) < budget.max_nodes:
        _, _, _, node = heapq.heappop(heap)
        if id(node.parent) not in index:  # unreachable by monotone scores; kept as a guard
            continue
        index[id(node)] = len(taken)
        taken.append(node)
        forced = tree.forced_child(node, budget.depth)
        if forced is not None:
            heapq.heappush(heap, (-forced.value, forced.depth, forced.seq, forced))
    vocab = tree.constraint.trie.vocab.size
    out = DraftTree([n.token for n in taken], [index[id(n.parent)] for n in taken],
                    [n.value - _parent(n).value for n in taken] if calibrated else [n.logprob for n in taken],
                    vocab_size=vocab, q_logprobs=[n.logprob for n in taken] if calibrated else None)
    if want_probs:
        parents = set(out.parents)
        expanded = [n for n in [tree.root, *taken] if index[id(n)] in parents]
        out.expanded = [index[id(n)] for n in expanded]
        out.probs = np.stack([_probs(tree, n, vocab) for n in expanded]) if expanded \
            else np.zeros((0, vocab), dtype=np.float32)
    fed: dict[tuple[int, ...], int] = {}
    outputs: dict[tuple[int, ...], torch.Tensor] = {}
    for n in tree.nodes:
        if n.slot >= 0 or n.out is not None:
            path = n.path()
            if n.slot >= 0:
                fed[path] = n.slot
            if n.out is not None:
                outputs[path] = n.out
    if tree.root.out is not None:
        outputs[()] = tree.root.out
    return BuiltTree(out, fed, outputs)


def _parent(node: Node) -> Node:
    assert node.parent is not None, "a tree node below the root"
    return node.parent


def _probs(tree: CandidateTree, node: Node, vocab: int) -> np.ndarray:
    """The distribution the node's children were drafted from: q, or a point mass on a forced token."""
    if node.out is not None:
        return node.out.exp().numpy().astype(np.float32)
    allowed = tree.allowed(node)
    probs = np.zeros(vocab, dtype=np.float32)
    if len(allowed) == 1:
        probs[int(allowed[0])] = 1.0
    return probs


def merge_trees(trees: list[DraftTree], max_nodes: int, want_probs: bool = False,
                acceptance: Sequence[Calibration | DepthCalibration | None] = ()) -> DraftTree:
    """Union of several drafters' trees (shared paths merged), scored by the best source's cumulative
    log q, cut to the best max_nodes (connected, priority order). Draft probs come from the first tree
    that expanded a node. `acceptance[i]`: tree i's scores read as its calibrated acceptance, log f_i(q), so
    sources whose q mean different things (a model's softmax, a pool's match frequency) compete fairly."""
    nodes: dict[tuple[int, ...], float] = {}
    dist: dict[tuple[int, ...], np.ndarray] = {}
    vocab = max((t.vocab_size for t in trees), default=0)
    for i, tree in enumerate(trees):
        calibration = acceptance[i] if i < len(acceptance) else None
        paths = [tuple(tree.path_tokens(i)) for i in range(len(tree))]
        scores = tree.scores()
        if calibration is not None:  # it learnt from the source's own q
            scores = [math.log(max(calibration.accepted_at(s, len(p)), 1e-12)) for s, p in zip(tree.q_scores(), paths,
                                                                                              strict=True)]
        for path, score in zip(paths, scores, strict=True):
            nodes[path] = max(nodes.get(path, -math.inf), score)
        if tree.probs is not None:
            for j, e in enumerate(tree.expanded):
                dist.setdefault(() if e < 0 else paths[e], tree.probs[j])
    # a path is no likelier than its parent: the better source's score for a child can exceed the other source's
    # for its parent, and a child ranked before its parent would be skipped for good
    for path in sorted(nodes, key=len):
        if path[:-1] in nodes:
            nodes[path] = min(nodes[path], nodes[path[:-1]])
    order = sorted(nodes, key=lambda p: (-nodes[p], len(p), p))
    index: dict[tuple[int, ...], int] = {(): -1}
    tokens: list[int] = []
    parents: list[int] = []
    logprobs: list[float] = []
    for path in order:
        if len(tokens) >= max_nodes:
            break
        if path[:-1] not in index:
            continue
        index[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(index[path[:-1]])
        logprobs.append(nodes[path] - (nodes[path[:-1]] if path[:-1] else 0.0))
    out = DraftTree(tokens, parents, logprobs, vocab_size=vocab)
    if want_probs:
        has_kids = set(parents)
        kept = [p for p in index if index[p] in has_kids and p in dist]
        out.expanded = [index[p] for p in kept]
        out.probs = np.stack([dist[p] for p in kept]) if kept else np.zeros((0, vocab), dtype=np.float32)
    return out
