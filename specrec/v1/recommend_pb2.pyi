from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodingOptions(_message.Message):
    __slots__ = ("mode", "temperature", "seed", "policy", "max_tree_nodes", "drafter", "include_history")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[DecodingOptions.Mode]
        MODE_GREEDY: _ClassVar[DecodingOptions.Mode]
        MODE_SAMPLING: _ClassVar[DecodingOptions.Mode]
        MODE_RELAXED: _ClassVar[DecodingOptions.Mode]
    MODE_UNSPECIFIED: DecodingOptions.Mode
    MODE_GREEDY: DecodingOptions.Mode
    MODE_SAMPLING: DecodingOptions.Mode
    MODE_RELAXED: DecodingOptions.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    mode: DecodingOptions.Mode
    temperature: float
    seed: int
    policy: str
    max_tree_nodes: int
    drafter: str
    include_history: bool
    def __init__(self, mode: _Optional[_Union[DecodingOptions.Mode, str]] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., policy: _Optional[str] = ..., max_tree_nodes: _Optional[int] = ..., drafter: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("history", "num_items", "options", "request_id", "strict_history", "filters")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STRICT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedScalarFieldContainer[str]
    num_items: int
    options: DecodingOptions
    request_id: str
    strict_history: bool
    filters: ItemFilters
    def __init__(self, history: _Optional[_Iterable[str]] = ..., num_items: _Optional[int] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., strict_history: _Optional[bool] = ..., filters: _Optional[_Union[ItemFilters, _Mapping]] = ...) -> None: ...

class ItemFilters(_message.Message):
    __slots__ = ("allow_item_ids", "deny_item_ids", "allow_categories", "deny_categories")
    ALLOW_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    DENY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DENY_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    allow_item_ids: _containers.RepeatedScalarFieldContainer[str]
    deny_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allow_categories: _containers.RepeatedScalarFieldContainer[str]
    deny_categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allow_item_ids: _Optional[_Iterable[str]] = ..., deny_item_ids: _Optional[_Iterable[str]] = ..., allow_categories: _Optional[_Iterable[str]] = ..., deny_categories: _Optional[_Iterable[str]] = ...) -> None: ...

class FilterReport(_message.Message):
    __slots__ = ("eligible_items", "unknown_ids")
    ELIGIBLE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    eligible_items: int
    unknown_ids: int
    def __init__(self, eligible_items: _Optional[int] = ..., unknown_ids: _Optional[int] = ...) -> None: ...

class HistoryReport(_message.Message):
    __slots__ = ("used_items", "unknown_items", "unknown_item_ids", "truncated_items", "cold_start")
    USED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    used_items: int
    unknown_items: int
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    truncated_items: int
    cold_start: bool
    def __init__(self, used_items: _Optional[int] = ..., unknown_items: _Optional[int] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ..., truncated_items: _Optional[int] = ..., cold_start: _Optional[bool] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "title", "semantic_id", "log_prob")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    semantic_id: _containers.RepeatedScalarFieldContainer[int]
    log_prob: float
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., semantic_id: _Optional[_Iterable[int]] = ..., log_prob: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("rounds", "drafted_tokens", "accepted_tokens", "tau", "draft_ms", "verify_ms", "network_ms", "total_ms", "fallback_rounds", "policy", "tree_rounds", "ready_trees", "start_trees")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TREE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    READY_TREES_FIELD_NUMBER: _ClassVar[int]
    START_TREES_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    tau: float
    draft_ms: float
    verify_ms: float
    network_ms: float
    total_ms: float
    fallback_rounds: int
    policy: str
    tree_rounds: int
    ready_trees: int
    start_trees: int
    def __init__(self, rounds: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., tau: _Optional[float] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., fallback_rounds: _Optional[int] = ..., policy: _Optional[str] = ..., tree_rounds: _Optional[int] = ..., ready_trees: _Optional[int] = ..., start_trees: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "stats", "trace_id", "request_id", "history", "total_log_prob", "filters", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    stats: Stats
    trace_id: str
    request_id: str
    history: HistoryReport
    total_log_prob: float
    filters: FilterReport
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., history: _Optional[_Union[HistoryReport, _Mapping]] = ..., total_log_prob: _Optional[float] = ..., filters: _Optional[_Union[FilterReport, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests", "concurrency")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    concurrency: int
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ..., concurrency: _Optional[int] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("index", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: RecommendResponse
    error: UserError
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[RecommendResponse, _Mapping]] = ..., error: _Optional[_Union[UserError, _Mapping]] = ...) -> None: ...

class UserError(_message.Message):
    __slots__ = ("code", "message", "field", "retry_after_ms", "request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    retry_after_ms: int
    request_id: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamRecommendRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: RecommendRequest
    def __init__(self, request: _Optional[_Union[RecommendRequest, _Mapping]] = ...) -> None: ...

class StreamRecommendResponse(_message.Message):
    __slots__ = ("item", "done")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    item: Item
    done: RecommendResponse
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., done: _Optional[_Union[RecommendResponse, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "num_items", "options", "request_id", "filters")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    prompt: _containers.RepeatedScalarFieldContainer[int]
    num_items: int
    options: DecodingOptions
    request_id: str
    filters: ItemFilters
    def __init__(self, prompt: _Optional[_Iterable[int]] = ..., num_items: _Optional[int] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., filters: _Optional[_Union[ItemFilters, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "done", "stats", "request_id", "log_probs", "model_version")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    stats: Stats
    request_id: str
    log_probs: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., request_id: _Optional[str] = ..., log_probs: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("history", "k", "beam_width", "plain", "max_tree_nodes", "drafter", "include_history", "request_id", "strict_history", "filters")
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BEAM_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PLAIN_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STRICT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    beam_width: int
    plain: bool
    max_tree_nodes: int
    drafter: str
    include_history: bool
    request_id: str
    strict_history: bool
    filters: ItemFilters
    def __init__(self, history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., beam_width: _Optional[int] = ..., plain: _Optional[bool] = ..., max_tree_nodes: _Optional[int] = ..., drafter: _Optional[str] = ..., include_history: _Optional[bool] = ..., request_id: _Optional[str] = ..., strict_history: _Optional[bool] = ..., filters: _Optional[_Union[ItemFilters, _Mapping]] = ...) -> None: ...

class RetrieveStats(_message.Message):
    __slots__ = ("rounds", "tree_nodes", "drafted_nodes", "draft_ms", "verify_ms", "total_ms", "tree_budget")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_NODES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TREE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    tree_nodes: int
    drafted_nodes: int
    draft_ms: float
    verify_ms: float
    total_ms: float
    tree_budget: int
    def __init__(self, rounds: _Optional[int] = ..., tree_nodes: _Optional[int] = ..., drafted_nodes: _Optional[int] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tree_budget: _Optional[int] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("items", "stats", "request_id", "history", "filters", "model_version", "trace_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    stats: RetrieveStats
    request_id: str
    history: HistoryReport
    filters: FilterReport
    model_version: str
    trace_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., stats: _Optional[_Union[RetrieveStats, _Mapping]] = ..., request_id: _Optional[str] = ..., history: _Optional[_Union[HistoryReport, _Mapping]] = ..., filters: _Optional[_Union[FilterReport, _Mapping]] = ..., model_version: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...
