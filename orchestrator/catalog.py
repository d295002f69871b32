"""The item catalog as clients see it: external item ids <-> semantic-ID tokens, request validation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.errors import RequestInvalid
from specrec.model_identity import artifact_version
from specrec.models.profiles import TargetProfile
from specrec.semantic_ids.categories import load_categories
from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.trie import ItemTrie
from specrec.semantic_ids.vocab import BOS, REC, SEP


@dataclass
class ResolvedHistory:
    """A client history as the target reads it. Unknown ids are skipped (new items the model has never seen are
    the rule in a catalog that changes hourly); past the limit the oldest known items go; with nothing left the
    prompt is BOS REC, a cold start: the target's list for a user it knows nothing about."""

    prompt: list[int]
    used: int  # items in the prompt
    unknown_ids: list[str] = field(default_factory=list)  # skipped, in request order
    truncated: int = 0  # known items dropped, oldest first

    @property
    def cold_start(self) -> bool:
        return self.used == 0


@dataclass(frozen=True)
class ItemFilter:
    """The eligible items in the shorter of two forms: the items banned, or the only items allowed (then
    `banned` is empty): every service gets the filter, and an allow-list of 100 items at 10^6 items should cost
    100 indices on each hop, not 999,900."""

    banned: tuple[int, ...]  # item indices no list may hold
    allowed: tuple[int, ...]  # if any: the only item indices a list may hold
    unknown_ids: int  # filter ids the catalog does not know (ignored)
    eligible: int  # catalog items the filters leave (before the history's)


class Catalog:
    def __init__(self, artifacts: str | Path):
        self.sids = SemanticIds.load(Path(artifacts))
        self.trie = ItemTrie(self.sids)
        self.index = {item_id: i for i, item_id in enumerate(self.sids.item_ids)}
        self.max_len = target_max_len(Path(artifacts))
        self.version = artifact_version(Path(artifacts).resolve())  # the training this catalog belongs to
        self.categories = load_categories(Path(artifacts), self.sids.item_ids)  # name -> item indices

    def list_len(self, prompt: list[int], n_items: int) -> int:
        """Positions a finished list takes on the target: the prompt, n items of codes + SEP, then EOS."""
        return len(prompt) + n_items * self.sids.tokens_per_item + 1

    def check_fits(self, prompt: list[int], n_items: int) -> None:
        """RequestInvalid unless the whole list fits the target's positions (else it would fail mid-stream)."""
        need = self.list_len(prompt, n_items)
        if need > self.max_len:
            raise RequestInvalid(f"a prompt of {len(prompt)} tokens and {n_items} items of {self.sids.tokens_per_item} "
                                 f"tokens need {need} positions, over the target's {self.max_len}: send a shorter "
                                 "history or ask for fewer items", "num_items")

    def prompt(self, history: list[str], max_history: int, strict: bool = False) -> ResolvedHistory:
        """The target's prompt for a client history (see ResolvedHistory); `strict`: refuse what it would skip."""
        if strict:
            self.check_strict(history, max_history)
        known, unknown = [], []
        for item_id in history:
            item = self.index.get(item_id)
            if item is None:
                unknown.append(item_id)
            else:
                known.append(item)
        kept = known[len(known) - max_history:] if len(known) > max_history else known
        tokens = [BOS]
        for item in kept:
            tokens += self.sids.item_tokens(item) + [SEP]
        return ResolvedHistory(tokens + [REC], used=len(kept), unknown_ids=unknown,
                               truncated=len(known) - len(kept))

    def check_strict(self, history: list[str], max_history: int) -> None:
        """RequestInvalid for what the lenient reading would skip, truncate or answer as a cold start."""
        if not history:
            raise RequestInvalid("history is empty: give at least one item id the catalog knows "
                                 "(or leave strict_history off for a cold-start list)", "history")
        if len(history) > max_history:
            raise RequestInvalid(f"history has {len(history)} items, over the limit of {max_history}; "
                                 "send the most recent ones (or leave strict_history off to keep them)", "history")
        for pos, item_id in enumerate(history):
            if item_id not in self.index:
                raise RequestInvalid(f"history[{pos}] = {item_id!r} is not an item id of this catalog",
                                     f"history[{pos}]")

    def constraint(self, n_items: int, exclude_history: bool, banned: Sequence[int] = (),
                   allowed: Sequence[int] = ()) -> ListConstraint:
        return ListConstraint(self.trie, n_items, exclude_history, banned, allowed)

    def item_filter(self, allow: Sequence[str], deny: Sequence[str], allow_categories: Sequence[str] = (),
                    deny_categories: Sequence[str] = ()) -> ItemFilter:
        """The items a request's filters leave: in the allow-list (empty: every item) and in an allowed category
        (none named: any), and not in the deny-list nor a denied category. Ids and category names the
        catalog does not know are counted, not refused (a filter built from a feed may name items not trained)."""
        if (allow_categories or deny_categories) and not self.categories:
            raise RequestInvalid("this catalog has no item categories: filter by item ids", "filters")
        unknown = sum(item_id not in self.index for item_id in (*allow, *deny))
        unknown += sum(name not in self.categories for name in (*allow_categories, *deny_categories))
        keep = np.ones(self.sids.n_items, dtype=bool)  # arrays, not sets: an allow-list at 10^6 items rules out ~10^6
        keep[[self.index[i] for i in deny if i in self.index]] = False
        keep[self._in_categories(deny_categories)] = False
        if allow:
            keep &= self._only(_some([self.index[i] for i in allow if i in self.index], "allow_item_ids"))
        if allow_categories:
            keep &= self._only(_some(self._in_categories(allow_categories), "allow_categories"))
        eligible = np.flatnonzero(keep)
        if 0 < 2 * len(eligible) < len(keep):  # none eligible: banned all (no allowed items means no allow rule)
            return ItemFilter((), tuple(eligible.tolist()), unknown, len(eligible))
        return ItemFilter(tuple(np.flatnonzero(~keep).tolist()), (), unknown, len(eligible))

    def _in_categories(self, names: Sequence[str]) -> np.ndarray:
        found = [self.categories[name] for name in names if name in self.categories]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _only(self, items: Sequence[int] | np.ndarray) -> np.ndarray:
        only = np.zeros(self.sids.n_items, dtype=bool)
        only[items] = True
        return only

    def item_of(self, tokens: list[int]) -> int | None:
        return self.sids.item_of_tokens(tokens)


def _some(allowed: list[int] | np.ndarray, field: str) -> list[int] | np.ndarray:
    """An allow-list that names no item of the catalog would leave nothing to recommend: say which one."""
    if len(allowed) == 0:
        raise RequestInvalid(f"filters.{field} names no item of this catalog: no item could be recommended",
                             f"filters.{field}")
    return allowed


def target_max_len(artifacts: Path) -> int:
    """Positions the target model supports, from its HF config beside the semantic IDs (else the profiles' default)."""
    try:
        return int(json.loads((artifacts / "target" / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError):
        return TargetProfile.max_len
