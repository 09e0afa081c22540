from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScheduleRequestPB(_message.Message):
    __slots__ = ("request_id", "seq_len", "block_cache_keys", "generate_timeout", "model", "request_time_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    seq_len: int
    block_cache_keys: _containers.RepeatedScalarFieldContainer[int]
    generate_timeout: int
    model: str
    request_time_ms: int
    def __init__(self, request_id: _Optional[int] = ..., seq_len: _Optional[int] = ..., block_cache_keys: _Optional[_Iterable[int]] = ..., generate_timeout: _Optional[int] = ..., model: _Optional[str] = ..., request_time_ms: _Optional[int] = ...) -> None: ...

class DebugInfoPB(_message.Message):
    __slots__ = ("running_batch_size", "queue_size", "waiting_time_ms", "available_kv_cache_len", "estimate_ttft_ms", "estimate_tpot_ms", "hit_cache_len", "reserved_tokens", "degraded")
    RUNNING_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WAITING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_KV_CACHE_LEN_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    HIT_CACHE_LEN_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    running_batch_size: int
    queue_size: int
    waiting_time_ms: int
    available_kv_cache_len: int
    estimate_ttft_ms: float
    estimate_tpot_ms: float
    hit_cache_len: int
    reserved_tokens: int
    degraded: bool
    def __init__(self, running_batch_size: _Optional[int] = ..., queue_size: _Optional[int] = ..., waiting_time_ms: _Optional[int] = ..., available_kv_cache_len: _Optional[int] = ..., estimate_ttft_ms: _Optional[float] = ..., estimate_tpot_ms: _Optional[float] = ..., hit_cache_len: _Optional[int] = ..., reserved_tokens: _Optional[int] = ..., degraded: _Optional[bool] = ...) -> None: ...

class ServerStatusPB(_message.Message):
    __slots__ = ("role", "server_ip", "http_port", "grpc_port", "group", "request_id", "prefill_time", "success", "code", "message", "debug_info")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVER_IP_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEBUG_INFO_FIELD_NUMBER: _ClassVar[int]
    role: str
    server_ip: str
    http_port: int
    grpc_port: int
    group: str
    request_id: int
    prefill_time: int
    success: bool
    code: int
    message: str
    debug_info: DebugInfoPB
    def __init__(self, role: _Optional[str] = ..., server_ip: _Optional[str] = ..., http_port: _Optional[int] = ..., grpc_port: _Optional[int] = ..., group: _Optional[str] = ..., request_id: _Optional[int] = ..., prefill_time: _Optional[int] = ..., success: _Optional[bool] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., debug_info: _Optional[_Union[DebugInfoPB, _Mapping]] = ...) -> None: ...

class ScheduleResponsePB(_message.Message):
    __slots__ = ("server_status", "success", "code", "error_message", "real_master_host", "queue_length", "degraded")
    SERVER_STATUS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REAL_MASTER_HOST_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    server_status: _containers.RepeatedCompositeFieldContainer[ServerStatusPB]
    success: bool
    code: int
    error_message: str
    real_master_host: str
    queue_length: int
    degraded: bool
    def __init__(self, server_status: _Optional[_Iterable[_Union[ServerStatusPB, _Mapping]]] = ..., success: _Optional[bool] = ..., code: _Optional[int] = ..., error_message: _Optional[str] = ..., real_master_host: _Optional[str] = ..., queue_length: _Optional[int] = ..., degraded: _Optional[bool] = ...) -> None: ...

class ReleaseRequestPB(_message.Message):
    __slots__ = ("request_id", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    model: str
    def __init__(self, request_id: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class ReleaseResponsePB(_message.Message):
    __slots__ = ("success", "code", "request_id", "released")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    success: bool
    code: int
    request_id: int
    released: int
    def __init__(self, success: _Optional[bool] = ..., code: _Optional[int] = ..., request_id: _Optional[int] = ..., released: _Optional[int] = ...) -> None: ...
