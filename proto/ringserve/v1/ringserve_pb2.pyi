import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    HBM: _ClassVar[Tier]
    HOST: _ClassVar[Tier]
    REDIS: _ClassVar[Tier]
    MOVING: _ClassVar[Tier]
    LOST: _ClassVar[Tier]

class RetentionClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETENTION_CLASS_UNSPECIFIED: _ClassVar[RetentionClass]
    HOT: _ClassVar[RetentionClass]
    STANDARD: _ClassVar[RetentionClass]
    COLD: _ClassVar[RetentionClass]

class PersistMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERSIST_MODE_UNSPECIFIED: _ClassVar[PersistMode]
    ON_DEMOTE: _ClassVar[PersistMode]
    WRITE_THROUGH: _ClassVar[PersistMode]

class KvFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_FORMAT_UNSPECIFIED: _ClassVar[KvFormat]
    EXACT: _ClassVar[KvFormat]
    FP8: _ClassVar[KvFormat]
    INT4: _ClassVar[KvFormat]
    KEEP: _ClassVar[KvFormat]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
    STOP_SEQUENCE: _ClassVar[FinishReason]
    CONTEXT_FULL: _ClassVar[FinishReason]

class UsageGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUP_BY_UNSPECIFIED: _ClassVar[UsageGroupBy]
    SESSION: _ClassVar[UsageGroupBy]
    TIER: _ClassVar[UsageGroupBy]
    DAY: _ClassVar[UsageGroupBy]
    KV_FORMAT: _ClassVar[UsageGroupBy]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    JSONL: _ClassVar[ExportFormat]
    CSV: _ClassVar[ExportFormat]
TIER_UNSPECIFIED: Tier
HBM: Tier
HOST: Tier
REDIS: Tier
MOVING: Tier
LOST: Tier
RETENTION_CLASS_UNSPECIFIED: RetentionClass
HOT: RetentionClass
STANDARD: RetentionClass
COLD: RetentionClass
PERSIST_MODE_UNSPECIFIED: PersistMode
ON_DEMOTE: PersistMode
WRITE_THROUGH: PersistMode
KV_FORMAT_UNSPECIFIED: KvFormat
EXACT: KvFormat
FP8: KvFormat
INT4: KvFormat
KEEP: KvFormat
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason
STOP_SEQUENCE: FinishReason
CONTEXT_FULL: FinishReason
USAGE_GROUP_BY_UNSPECIFIED: UsageGroupBy
SESSION: UsageGroupBy
TIER: UsageGroupBy
DAY: UsageGroupBy
KV_FORMAT: UsageGroupBy
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
JSONL: ExportFormat
CSV: ExportFormat

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("name", "display_name", "tenant", "size_tokens", "tier", "retention", "persist", "create_time", "expire_time", "ttl", "update_time", "group", "kv_bytes", "allow_quantized_kv", "kv_format", "kv_keep_fraction", "exact_kv_bytes", "stored_kv_bytes", "token_seconds", "cost_accrued", "currency", "billed_through", "retention_cost", "compute_cost", "retention_rate")
    class TokenSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PERSIST_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_QUANTIZED_KV_FIELD_NUMBER: _ClassVar[int]
    KV_FORMAT_FIELD_NUMBER: _ClassVar[int]
    KV_KEEP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXACT_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_ACCRUED_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BILLED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    RETENTION_COST_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_COST_FIELD_NUMBER: _ClassVar[int]
    RETENTION_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    tenant: str
    size_tokens: int
    tier: Tier
    retention: RetentionClass
    persist: PersistMode
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    update_time: _timestamp_pb2.Timestamp
    group: str
    kv_bytes: int
    allow_quantized_kv: bool
    kv_format: KvFormat
    kv_keep_fraction: float
    exact_kv_bytes: int
    stored_kv_bytes: int
    token_seconds: _containers.ScalarMap[str, float]
    cost_accrued: float
    currency: str
    billed_through: _timestamp_pb2.Timestamp
    retention_cost: float
    compute_cost: float
    retention_rate: float
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., tenant: _Optional[str] = ..., size_tokens: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., retention: _Optional[_Union[RetentionClass, str]] = ..., persist: _Optional[_Union[PersistMode, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group: _Optional[str] = ..., kv_bytes: _Optional[int] = ..., allow_quantized_kv: _Optional[bool] = ..., kv_format: _Optional[_Union[KvFormat, str]] = ..., kv_keep_fraction: _Optional[float] = ..., exact_kv_bytes: _Optional[int] = ..., stored_kv_bytes: _Optional[int] = ..., token_seconds: _Optional[_Mapping[str, float]] = ..., cost_accrued: _Optional[float] = ..., currency: _Optional[str] = ..., billed_through: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retention_cost: _Optional[float] = ..., compute_cost: _Optional[float] = ..., retention_rate: _Optional[float] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("text", "token_ids", "messages", "ttl", "expire_time", "retention", "persist", "display_name", "allow_quantized_kv", "request_id", "kv_format", "kv_keep_fraction")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PERSIST_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOW_QUANTIZED_KV_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FORMAT_FIELD_NUMBER: _ClassVar[int]
    KV_KEEP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    ttl: _duration_pb2.Duration
    expire_time: _timestamp_pb2.Timestamp
    retention: RetentionClass
    persist: PersistMode
    display_name: str
    allow_quantized_kv: bool
    request_id: str
    kv_format: KvFormat
    kv_keep_fraction: float
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retention: _Optional[_Union[RetentionClass, str]] = ..., persist: _Optional[_Union[PersistMode, str]] = ..., display_name: _Optional[str] = ..., allow_quantized_kv: _Optional[bool] = ..., request_id: _Optional[str] = ..., kv_format: _Optional[_Union[KvFormat, str]] = ..., kv_keep_fraction: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("tokens_done", "tokens_total")
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    tokens_done: int
    tokens_total: int
    def __init__(self, tokens_done: _Optional[int] = ..., tokens_total: _Optional[int] = ...) -> None: ...

class CreateSessionEvent(_message.Message):
    __slots__ = ("progress", "session")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    session: Session
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session", "update_mask")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    session: Session
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AppendToSessionRequest(_message.Message):
    __slots__ = ("name", "text", "token_ids", "messages", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    request_id: str
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("name", "text", "token_ids", "messages", "sampling", "max_tokens", "stop", "retain_turn", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RETAIN_TURN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    sampling: SamplingParams
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    retain_turn: bool
    request_id: str
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., retain_turn: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "generated_tokens", "cost", "currency")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    cost: float
    currency: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., cost: _Optional[float] = ..., currency: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text_delta", "token_ids", "usage", "finish_reason", "group")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    text_delta: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    usage: Usage
    finish_reason: FinishReason
    group: str
    def __init__(self, text_delta: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., group: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "device", "healthy", "kv_bytes", "free_kv_bytes")
    class KvBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    healthy: bool
    kv_bytes: _containers.ScalarMap[str, int]
    free_kv_bytes: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., healthy: _Optional[bool] = ..., kv_bytes: _Optional[_Mapping[str, int]] = ..., free_kv_bytes: _Optional[int] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("id", "ranks", "sessions", "kv_bytes", "free_kv_bytes", "healthy", "scheduler")
    class KvBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    id: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    sessions: int
    kv_bytes: _containers.ScalarMap[str, int]
    free_kv_bytes: int
    healthy: bool
    scheduler: SchedulerStatus
    def __init__(self, id: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., sessions: _Optional[int] = ..., kv_bytes: _Optional[_Mapping[str, int]] = ..., free_kv_bytes: _Optional[int] = ..., healthy: _Optional[bool] = ..., scheduler: _Optional[_Union[SchedulerStatus, _Mapping]] = ...) -> None: ...

class SchedulerStatus(_message.Message):
    __slots__ = ("waiting", "running", "prefilling", "decoding", "steps", "last_batch", "prefill_tokens", "decode_tokens", "preemptions", "last_step_seconds")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PREFILLING_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    prefilling: int
    decoding: int
    steps: int
    last_batch: int
    prefill_tokens: int
    decode_tokens: int
    preemptions: int
    last_step_seconds: float
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., prefilling: _Optional[int] = ..., decoding: _Optional[int] = ..., steps: _Optional[int] = ..., last_batch: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., preemptions: _Optional[int] = ..., last_step_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("groups", "sessions", "redis_healthy", "metered_sessions")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REDIS_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    METERED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    sessions: int
    redis_healthy: bool
    metered_sessions: int
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., sessions: _Optional[int] = ..., redis_healthy: _Optional[bool] = ..., metered_sessions: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "start_time", "end_time", "group_by", "session")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: UsageGroupBy
    session: str
    def __init__(self, tenant: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[UsageGroupBy, str]] = ..., session: _Optional[str] = ...) -> None: ...

class UsageLineItem(_message.Message):
    __slots__ = ("key", "token_seconds", "prefill_tokens", "cached_tokens", "generated_tokens", "retention_cost", "compute_cost", "cost", "records")
    class TokenSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_COST_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_COST_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    token_seconds: _containers.ScalarMap[str, float]
    prefill_tokens: int
    cached_tokens: int
    generated_tokens: int
    retention_cost: float
    compute_cost: float
    cost: float
    records: int
    def __init__(self, key: _Optional[str] = ..., token_seconds: _Optional[_Mapping[str, float]] = ..., prefill_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., retention_cost: _Optional[float] = ..., compute_cost: _Optional[float] = ..., cost: _Optional[float] = ..., records: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("line_items", "total", "currency", "start_time", "end_time", "accruing_cost")
    LINE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCRUING_COST_FIELD_NUMBER: _ClassVar[int]
    line_items: _containers.RepeatedCompositeFieldContainer[UsageLineItem]
    total: UsageLineItem
    currency: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    accruing_cost: float
    def __init__(self, line_items: _Optional[_Iterable[_Union[UsageLineItem, _Mapping]]] = ..., total: _Optional[_Union[UsageLineItem, _Mapping]] = ..., currency: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accruing_cost: _Optional[float] = ...) -> None: ...

class ExportUsageRequest(_message.Message):
    __slots__ = ("tenant", "start_time", "end_time", "format", "session")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    format: ExportFormat
    session: str
    def __init__(self, tenant: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., session: _Optional[str] = ...) -> None: ...

class ExportUsageChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
