from specrec.draft.v1 import tree_pb2 as _tree_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftBudget(_message.Message):
    __slots__ = ("depth", "max_nodes", "top_k", "min_path_prob")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_PATH_PROB_FIELD_NUMBER: _ClassVar[int]
    depth: int
    max_nodes: int
    top_k: int
    min_path_prob: float
    def __init__(self, depth: _Optional[int] = ..., max_nodes: _Optional[int] = ..., top_k: _Optional[int] = ..., min_path_prob: _Optional[float] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("context", "n_items", "exclude_history", "budget", "drafter", "want_probs", "user_group", "banned_items", "single_tree", "allowed_items")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    WANT_PROBS_FIELD_NUMBER: _ClassVar[int]
    USER_GROUP_FIELD_NUMBER: _ClassVar[int]
    BANNED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_TREE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    context: _containers.RepeatedScalarFieldContainer[int]
    n_items: int
    exclude_history: bool
    budget: DraftBudget
    drafter: str
    want_probs: bool
    user_group: str
    banned_items: _containers.RepeatedScalarFieldContainer[int]
    single_tree: bool
    allowed_items: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, context: _Optional[_Iterable[int]] = ..., n_items: _Optional[int] = ..., exclude_history: _Optional[bool] = ..., budget: _Optional[_Union[DraftBudget, _Mapping]] = ..., drafter: _Optional[str] = ..., want_probs: _Optional[bool] = ..., user_group: _Optional[str] = ..., banned_items: _Optional[_Iterable[int]] = ..., single_tree: _Optional[bool] = ..., allowed_items: _Optional[_Iterable[int]] = ...) -> None: ...

class AdvanceSession(_message.Message):
    __slots__ = ("committed", "budget", "then_plain")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    THEN_PLAIN_FIELD_NUMBER: _ClassVar[int]
    committed: _containers.RepeatedScalarFieldContainer[int]
    budget: DraftBudget
    then_plain: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, committed: _Optional[_Iterable[int]] = ..., budget: _Optional[_Union[DraftBudget, _Mapping]] = ..., then_plain: _Optional[_Iterable[int]] = ...) -> None: ...

class SpeculateRequest(_message.Message):
    __slots__ = ("open", "advance")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ADVANCE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    advance: AdvanceSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., advance: _Optional[_Union[AdvanceSession, _Mapping]] = ...) -> None: ...

class SpeculateResponse(_message.Message):
    __slots__ = ("tree", "draft_ahead_hit", "draft_ms")
    TREE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_HIT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    tree: _tree_pb2.TokenTree
    draft_ahead_hit: bool
    draft_ms: float
    def __init__(self, tree: _Optional[_Union[_tree_pb2.TokenTree, _Mapping]] = ..., draft_ahead_hit: _Optional[bool] = ..., draft_ms: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("live_sessions", "max_sessions", "sessions_opened", "sessions_rejected", "sessions_expired", "trees_drafted", "draft_ahead_hits", "draft_ahead_misses", "invalid_requests", "model_version", "draft_ahead_misses_by_reason", "drafter_forwards", "drafter_forward_seconds")
    class DraftAheadMissesByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    TREES_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_HITS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_MISSES_FIELD_NUMBER: _ClassVar[int]
    INVALID_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_MISSES_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    live_sessions: int
    max_sessions: int
    sessions_opened: int
    sessions_rejected: int
    sessions_expired: int
    trees_drafted: int
    draft_ahead_hits: int
    draft_ahead_misses: int
    invalid_requests: int
    model_version: str
    draft_ahead_misses_by_reason: _containers.ScalarMap[str, int]
    drafter_forwards: int
    drafter_forward_seconds: float
    def __init__(self, live_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., sessions_opened: _Optional[int] = ..., sessions_rejected: _Optional[int] = ..., sessions_expired: _Optional[int] = ..., trees_drafted: _Optional[int] = ..., draft_ahead_hits: _Optional[int] = ..., draft_ahead_misses: _Optional[int] = ..., invalid_requests: _Optional[int] = ..., model_version: _Optional[str] = ..., draft_ahead_misses_by_reason: _Optional[_Mapping[str, int]] = ..., drafter_forwards: _Optional[int] = ..., drafter_forward_seconds: _Optional[float] = ...) -> None: ...
