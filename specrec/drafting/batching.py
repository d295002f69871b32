"""One drafter forward for many sessions: a pooled KV cache (pages of rows, a session per row) and a step batcher
that merges the one-row steps sessions ask for at about the same time into one forward per page.

Continuous batching without a timer: the first thread to ask while no forward runs becomes the leader and runs
everything queued at that moment in one forward (per page), then whatever queued meanwhile, until the queue is
empty; the others wait for their rows' logits. Alone, a session runs its own step at once (no hop, no wait);
under load, every session that is between two steps joins the next forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specrec.models.llama import KVCache, ModelArgs
from specrec.semantic_ids.vocab import PAD

PAGE_ROWS = 16  # rows per cache page: sessions of one page share forwards
# Forward of the model over one page: (tokens, steps, positions, cache, rows, slots, mask) -> logits [B, T, vocab].
PageForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KVCache, torch.Tensor, torch.Tensor, torch.Tensor],
                       torch.Tensor]


class CachePage:
    """Cache rows for `rows` sessions; grown (all rows, copied) when a session needs more slots than the page has."""

    def __init__(self, args: ModelArgs, rows: int, slots: int, device: torch.device | str):
        self.args, self.device, self.rows = args, device, rows
        self.cache = KVCache(args, rows, slots, device=device)
        self.free = list(range(rows))
        self.lock = threading.Lock()  # held by a forward over the page, and by growth

    def ensure(self, slots: int, ceiling: int | None = None) -> None:
        """At least `slots` slots per row; grown by doubling (to amortise the copies), but not past `ceiling`."""
        with self.lock:
            old = self.cache
            if slots <= old.max_len:
                return
            size = max(slots, min(2 * old.max_len, ceiling or 2 * old.max_len))
            grown = KVCache(self.args, self.rows, size, device=self.device)
            grown.k[:, :, : old.max_len] = old.k
            grown.v[:, :, : old.max_len] = old.v
            grown.lengths = old.lengths  # the same list: sessions keep updating it
            self.cache = grown


class CachePool:
    """Hands out cache rows to sessions, page by page (a new page when every row is taken)."""

    def __init__(self, args: ModelArgs, slots: int, device: torch.device | str = "cpu", page_rows: int = PAGE_ROWS):
        self.args, self.slots, self.device, self.page_rows = args, slots, device, page_rows
        self.pages: list[CachePage] = []
        self.lock = threading.Lock()

    def acquire(self, slots: int) -> tuple[CachePage, int]:
        with self.lock:
            page = next((p for p in self.pages if p.free), None)
            if page is None:
                page = CachePage(self.args, self.page_rows, max(self.slots, slots), self.device)
                self.pages.append(page)
            row = page.free.pop(0)
        page.ensure(slots)
        page.cache.lengths[row] = 0
        return page, row

    def release(self, page: CachePage, row: int) -> None:
        with self.lock:
            page.cache.lengths[row] = 0
            page.free.append(row)
            page.free.sort()  # low rows first: busy rows stay consecutive, so forwards read them as a view
            # an empty page that grew goes back to its first size, so memory follows load; not the first page, which
            # every quiet period uses: regrowing it for each request's draft-ahead stalled that request (bench
            # drafter, trees of 8 x 32: 30-60 ms copies, trees past their deadline). Not blocking: a session's
            # finalizer may run this inside a forward that holds the page's lock
            if len(page.free) == page.rows and page.cache.max_len > self.slots and page is not self.pages[0] \
                    and page.lock.acquire(blocking=False):
                try:
                    page.cache = KVCache(self.args, page.rows, self.slots, device=self.device)
                finally:
                    page.lock.release()

    @property
    def rows_in_use(self) -> int:
        return sum(p.rows - len(p.free) for p in self.pages)


@dataclass
class _Step:
    page: CachePage
    row: int
    tokens: torch.Tensor  # [1, T] like the rest
    steps: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor  # [1, T, S]
    wake: threading.Event = field(default_factory=threading.Event)  # finished, or asked to lead
    finished: bool = False
    promoted: bool = False  # the previous leader handed leadership to this step's thread
    logits: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class BatchCounters:
    forwards: int = 0
    rows: int = 0  # session steps run; rows / forwards = the mean batch size
    seconds: float = 0.0  # spent in those forwards (inputs merged, model run, logits out)

    @property
    def mean_batch(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0


class StepBatcher:
    def __init__(self, forward: PageForward, device: torch.device | str = "cpu", merge: bool = True):
        self.forward = forward
        self.device = device
        # False: each step runs alone in its caller's thread, as many at once as threads ask (with one-row pages,
        # the draft service before batching: the baseline bench/draft_batching.py compares)
        self.merge = merge
        self.lock = threading.Lock()
        self.queue: list[_Step] = []
        self.leader = False
        self.counters = BatchCounters()

    def step(self, page: CachePage, row: int, tokens: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, vocab] of one session's step (inputs as PadDrafter.forward's, batch 1, its row)."""
        req = _Step(page, row, tokens, steps, positions, slots, mask)
        if not self.merge:
            self._run([req])
        else:
            with self.lock:
                self.queue.append(req)
                lead = not self.leader
                self.leader = self.leader or lead
            if lead:
                self._lead(req)
            while not req.finished:
                req.wake.wait()
                req.wake.clear()
                if req.promoted and not req.finished:
                    req.promoted = False
                    self._lead(req)
        if req.error is not None:
            raise req.error
        assert req.logits is not None
        return req.logits

    def _lead(self, own: _Step) -> None:
        """Run what is queued, forward after forward, until this thread's own step is done; then hand leadership
        to the oldest waiting step's thread, so no session waits on the others' forwards longer than one of its
        own steps."""
        while True:
            with self.lock:
                batch, self.queue = self.queue, []
                if not batch:
                    self.leader = False
                    return
            by_page: dict[int, list[_Step]] = {}
            for req in batch:
                by_page.setdefault(id(req.page), []).append(req)
            for reqs in by_page.values():
                self._run(sorted(reqs, key=lambda r: r.row))
            if own.finished:
                with self.lock:
                    if not self.queue:
                        self.leader = False
                        return
                    heir = self.queue[0]
                    heir.promoted = True
                heir.wake.set()
                return

    def _run(self, reqs: list[_Step]) -> None:
        t0 = time.perf_counter()
        try:
            page = reqs[0].page
            with page.lock, torch.inference_mode():
                logits = self.forward(*merge_steps(reqs, self.device), page.cache, *_rows_slots_mask(reqs,
                                                                                                      self.device))
            logits = logits.float().cpu()
            self.counters.seconds += time.perf_counter() - t0
            for b, req in enumerate(reqs):
                req.logits = logits[b: b + 1, : req.tokens.shape[1]]
            self.counters.forwards += 1
            self.counters.rows += len(reqs)
        except BaseException as err:  # every waiter must wake, with the error
            for req in reqs:
                req.error = err
        finally:
            for req in reqs:
                req.finished = True
                req.wake.set()


def merge_steps(reqs: list[_Step], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, steps, positions [B, T] of one-row steps, padded to the longest (PAD at position 0)."""
    if len(reqs) == 1:  # nothing to merge (a quiet service's every step): ~10 small tensor operations saved
        r = reqs[0]
        return r.tokens.to(device), r.steps.to(device), r.positions.to(device)
    t = max(r.tokens.shape[1] for r in reqs)
    out = []
    for name in ("tokens", "steps", "positions"):
        fill = PAD if name == "tokens" else 0
        x = torch.full((len(reqs), t), fill, dtype=torch.long)
        for b, r in enumerate(reqs):
            src = getattr(r, name)
            x[b, : src.shape[1]] = src[0]
        out.append(x.to(device))
    return out[0], out[1], out[2]


def _rows_slots_mask(reqs: list[_Step], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows [B], slots [B, T], mask [B, T, S]. A step's padding writes to the first slot past what it attends to
    (free: sessions hand out scratch slots in order and attend to all they handed out) and sees only that slot."""
    if len(reqs) == 1:  # no padding, so no padding slot
        r = reqs[0]
        return torch.tensor([r.row], device=device), r.slots.to(device), r.mask.to(device)
    t = max(r.tokens.shape[1] for r in reqs)
    span = max(r.mask.shape[-1] + 1 for r in reqs)
    slots = torch.zeros((len(reqs), t), dtype=torch.long)
    mask = torch.zeros((len(reqs), t, span), dtype=torch.bool)
    for b, r in enumerate(reqs):
        n, s = r.tokens.shape[1], r.mask.shape[-1]
        slots[b, :n] = r.slots[0]
        slots[b, n:] = s
        mask[b, :n, :s] = r.mask[0]
        mask[b, n:, s] = True
    rows = torch.as_tensor([r.row for r in reqs], dtype=torch.long)
    return rows.to(device), slots.to(device), mask.to(device)
