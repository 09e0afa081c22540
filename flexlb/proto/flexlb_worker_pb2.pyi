from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusVersionPB(_message.Message):
    __slots__ = ("latest_cache_version", "latest_finished_version")
    LATEST_CACHE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FINISHED_VERSION_FIELD_NUMBER: _ClassVar[int]
    latest_cache_version: int
    latest_finished_version: int
    def __init__(self, latest_cache_version: _Optional[int] = ..., latest_finished_version: _Optional[int] = ...) -> None: ...

class CacheVersionPB(_message.Message):
    __slots__ = ("latest_cache_version", "need_cache_keys")
    LATEST_CACHE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEED_CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    latest_cache_version: int
    need_cache_keys: bool
    def __init__(self, latest_cache_version: _Optional[int] = ..., need_cache_keys: _Optional[bool] = ...) -> None: ...

class CacheStatusPB(_message.Message):
    __slots__ = ("available_kv_cache", "total_kv_cache", "block_size", "version", "cache_keys")
    class CacheKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bool
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bool] = ...) -> None: ...
    AVAILABLE_KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    available_kv_cache: int
    total_kv_cache: int
    block_size: int
    version: int
    cache_keys: _containers.ScalarMap[int, bool]
    def __init__(self, available_kv_cache: _Optional[int] = ..., total_kv_cache: _Optional[int] = ..., block_size: _Optional[int] = ..., version: _Optional[int] = ..., cache_keys: _Optional[_Mapping[int, bool]] = ...) -> None: ...

class TaskInfoPB(_message.Message):
    __slots__ = ("request_id", "prefix_length", "input_length", "waiting_time_ms", "iterate_count", "end_time_ms", "dp_rank", "is_waiting")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WAITING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ITERATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    END_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    IS_WAITING_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    prefix_length: int
    input_length: int
    waiting_time_ms: int
    iterate_count: int
    end_time_ms: int
    dp_rank: int
    is_waiting: bool
    def __init__(self, request_id: _Optional[int] = ..., prefix_length: _Optional[int] = ..., input_length: _Optional[int] = ..., waiting_time_ms: _Optional[int] = ..., iterate_count: _Optional[int] = ..., end_time_ms: _Optional[int] = ..., dp_rank: _Optional[int] = ..., is_waiting: _Optional[bool] = ...) -> None: ...

class WorkerStatusPB(_message.Message):
    __slots__ = ("role", "available_concurrency", "running_task_info", "finished_task_list", "waiting_query_len", "running_query_len", "step_latency_ms", "iterate_count", "dp_size", "tp_size", "status_version", "alive", "precision", "latest_finished_version", "dp_rank", "available_kv_cache", "total_kv_cache", "http_port")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASK_INFO_FIELD_NUMBER: _ClassVar[int]
    FINISHED_TASK_LIST_FIELD_NUMBER: _ClassVar[int]
    WAITING_QUERY_LEN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_QUERY_LEN_FIELD_NUMBER: _ClassVar[int]
    STEP_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ITERATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FINISHED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    role: str
    available_concurrency: int
    running_task_info: _containers.RepeatedCompositeFieldContainer[TaskInfoPB]
    finished_task_list: _containers.RepeatedCompositeFieldContainer[TaskInfoPB]
    waiting_query_len: int
    running_query_len: int
    step_latency_ms: float
    iterate_count: int
    dp_size: int
    tp_size: int
    status_version: int
    alive: bool
    precision: str
    latest_finished_version: int
    dp_rank: int
    available_kv_cache: int
    total_kv_cache: int
    http_port: int
    def __init__(self, role: _Optional[str] = ..., available_concurrency: _Optional[int] = ..., running_task_info: _Optional[_Iterable[_Union[TaskInfoPB, _Mapping]]] = ..., finished_task_list: _Optional[_Iterable[_Union[TaskInfoPB, _Mapping]]] = ..., waiting_query_len: _Optional[int] = ..., running_query_len: _Optional[int] = ..., step_latency_ms: _Optional[float] = ..., iterate_count: _Optional[int] = ..., dp_size: _Optional[int] = ..., tp_size: _Optional[int] = ..., status_version: _Optional[int] = ..., alive: _Optional[bool] = ..., precision: _Optional[str] = ..., latest_finished_version: _Optional[int] = ..., dp_rank: _Optional[int] = ..., available_kv_cache: _Optional[int] = ..., total_kv_cache: _Optional[int] = ..., http_port: _Optional[int] = ...) -> None: ...
