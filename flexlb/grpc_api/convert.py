"""The gRPC schedule API's messages <-> the HTTP API's JSON shapes (flexlb/http/wire.py). Pure functions.

A request becomes the dict a JSON body would have decoded to, so ``parse_schedule_request`` validates both APIs alike
(an ``optional`` field the caller did not set is a key the JSON did not have). A reply is built from the very dict
the HTTP handler answers, key for key: a key the protobuf lacks raises ValueError rather than being dropped, and
tests/unit/test_schedule_proto_convert.py checks that every key wire.py writes has its field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from flexlb.http.wire import BadRequest
from flexlb.proto.flexlb_schedule_pb2 import (
    DebugInfoPB,
    ReleaseRequestPB,
    ReleaseResponsePB,
    ScheduleRequestPB,
    ScheduleResponsePB,
    ServerStatusPB,
)

# The fields a JSON body may leave out: sent as proto3 ``optional`` (explicit presence).
_OPTIONAL_SCHEDULE_FIELDS = ("seq_len", "generate_timeout", "model", "request_time_ms")

# Trailing metadata of a refused call: the flexlb code the HTTP API would have answered (8406, 8601).
CODE_METADATA_KEY = "flexlb-code"


def schedule_fields(request: ScheduleRequestPB) -> dict[str, Any]:
    """The JSON body of ``POST /rtp_llm/schedule`` that says what ``request`` says."""
    data: dict[str, Any] = {"request_id": request.request_id, "block_cache_keys": list(request.block_cache_keys)}
    for name in _OPTIONAL_SCHEDULE_FIELDS:
        if request.HasField(name):
            data[name] = getattr(request, name)
    return data


def release_fields(request: ReleaseRequestPB) -> dict[str, Any]:
    """The JSON body of ``POST /rtp_llm/release`` that says what ``request`` says."""
    data: dict[str, Any] = {"request_id": request.request_id}
    if request.HasField("model"):
        data["model"] = request.model
    return data


def schedule_response_pb(body: Mapping[str, Any]) -> ScheduleResponsePB:
    """The HTTP API's schedule answer (``wire.schedule_body``) as a message; a JSON null is an unset field."""
    fields = {key: value for key, value in body.items() if value is not None}
    fields["server_status"] = [_server_status_pb(s) for s in body.get("server_status", ())]
    return ScheduleResponsePB(**fields)


def _server_status_pb(status: Mapping[str, Any]) -> ServerStatusPB:
    fields = {key: value for key, value in status.items() if value is not None}
    if "debug_info" in fields:
        fields["debug_info"] = DebugInfoPB(**fields["debug_info"])
    return ServerStatusPB(**fields)


def release_response_pb(body: Mapping[str, Any]) -> ReleaseResponsePB:
    """The HTTP API's release answer as a message."""
    return ReleaseResponsePB(**body)


def to_json(message: Message) -> dict[str, Any]:
    """A message as the HTTP API's JSON: every field by its name, an unset ``optional`` field as None (JSON null),
    int64 as int (``json_format.MessageToDict`` writes int64 as strings and leaves out default values)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if field.is_repeated:
            out[field.name] = [to_json(v) for v in value] if is_message else list(value)
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = to_json(value) if is_message else value
    return out


# The gRPC status of each HTTP status a refusal can have (flexlb/http/wire.py BadRequest, flexlb/http/auth.py).
_STATUS_BY_HTTP = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code_for(exc: BadRequest) -> grpc.StatusCode:
    """The gRPC status of a request the client must fix: NOT_FOUND for an unknown model (HTTP 404),
    UNAUTHENTICATED / PERMISSION_DENIED for a missing or wrong token (401 / 403), RESOURCE_EXHAUSTED over the
    client's reservation cap (429), FAILED_PRECONDITION for a request id another client holds (409), else
    INVALID_ARGUMENT (HTTP 400)."""
    return _STATUS_BY_HTTP.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
