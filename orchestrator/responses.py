"""Responses from what a request produced: items from committed tokens (with their scores), stats, reports."""

from __future__ import annotations

from orchestrator.catalog import Catalog, ResolvedHistory
from orchestrator.errors import Refusal
from specrec.semantic_ids.vocab import SEP
from specrec.speculation.engine import RequestStats
from specrec.v1 import recommend_pb2 as pb

UNKNOWN_IDS_REPORTED = 20  # unknown history ids echoed in a response (all are counted)


def stats_message(s: RequestStats) -> pb.Stats:
    return pb.Stats(rounds=s.rounds, drafted_tokens=s.drafted, accepted_tokens=s.accepted, tau=s.tau,
                    draft_ms=s.draft_s * 1e3, verify_ms=s.verify_s * 1e3,
                    network_ms=max(0.0, s.total_s - s.draft_s - s.verify_s) * 1e3, total_ms=s.total_s * 1e3,
                    fallback_rounds=s.fallback_rounds, policy=s.policy,
                    tree_rounds=s.tree_rounds, ready_trees=s.ready_trees, start_trees=s.start_trees)


def history_report(resolved: ResolvedHistory) -> pb.HistoryReport:
    return pb.HistoryReport(used_items=resolved.used, unknown_items=len(resolved.unknown_ids),
                            unknown_item_ids=resolved.unknown_ids[:UNKNOWN_IDS_REPORTED],
                            truncated_items=resolved.truncated, cold_start=resolved.cold_start)


def item_message(catalog: Catalog, item: int, log_prob: float) -> pb.Item:
    sids = catalog.sids
    return pb.Item(item_id=sids.item_ids[item], title=sids.titles[item], semantic_id=[int(c) for c in sids.codes[item]],
                   log_prob=log_prob)


class ItemEmitter:
    """Turns committed tokens into items: an item is out once its SEP is committed."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.partial: list[int] = []
        self.partial_logprob = 0.0

    def feed(self, tokens: list[int], logprobs: list[float]) -> list[pb.Item]:
        items = []
        for tok, logprob in zip(tokens, logprobs, strict=True):
            self.partial_logprob += logprob  # SEP and EOS are forced: they add 0
            if tok == SEP:
                item = self.catalog.item_of(self.partial)
                if item is not None:
                    items.append(item_message(self.catalog, item, self.partial_logprob))
                self.partial, self.partial_logprob = [], 0.0
            else:
                self.partial.append(tok)
        return items


def user_error(refusal: Refusal) -> pb.UserError:
    """A batch user's refusal: what Recommend's status and google.rpc details would have said."""
    return pb.UserError(code=refusal.code.name, message=refusal.message, field=refusal.field,
                        retry_after_ms=refusal.retry_after_ms, request_id=refusal.request_id)
