"""The gRPC schedule API validates and answers as the HTTP API does: a message becomes the JSON body it stands for,
a reply is the HTTP answer's dict field for field (flexlb/grpc_api/convert.py)."""

from __future__ import annotations

import dataclasses

import grpc
import orjson
import pytest

from flexlb.domain import (
    Choice,
    ErrorCode,
    QueueStay,
    Role,
    ScheduleRequest,
    ScheduleResult,
    WorkerSpec,
    WorkerStatus,
    WorkerView,
)
from flexlb.grpc_api.convert import (
    release_fields,
    release_response_pb,
    schedule_fields,
    schedule_response_pb,
    status_code_for,
    to_json,
)
from flexlb.http.wire import BadRequest, parse_json_object, parse_request_id, parse_schedule_request, schedule_body
from flexlb.proto.flexlb_schedule_pb2 import ReleaseRequestPB, ScheduleRequestPB

VALID = {"request_id": 77, "seq_len": 100, "block_cache_keys": [111]}

# Every bad JSON body of tests/integration/test_http_api.py that a ScheduleRequestPB can express (the others are
# type errors protobuf rules out), with the message the HTTP API answers.
BAD: list[tuple[str, dict[str, object], str]] = [
    ("request_id missing", {"seq_len": 10}, "request_id: must not be 0"),
    ("request_id 0", {**VALID, "request_id": 0}, "request_id: must not be 0"),
    ("seq_len missing", {"request_id": 5}, "seq_len: required"),
    ("seq_len negative", {**VALID, "seq_len": -1}, "seq_len: -1 is out of range [0, 100000000]"),
    ("seq_len too large", {**VALID, "seq_len": 100_000_001}, "seq_len: 100000001 is out of range"),
    ("timeout 0", {**VALID, "generate_timeout": 0}, "generate_timeout: 0 is out of range"),
    ("timeout negative", {**VALID, "generate_timeout": -5}, "generate_timeout: -5 is out of range"),
    ("request time negative", {**VALID, "request_time_ms": -1}, "request_time_ms: -1 is out of range"),
]


def http_parse(body: dict[str, object]) -> ScheduleRequest:
    return parse_schedule_request(parse_json_object(orjson.dumps(body)))


def grpc_parse(body: dict[str, object]) -> ScheduleRequest:
    return parse_schedule_request(schedule_fields(ScheduleRequestPB(**body)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("case", "body", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_refused_with_the_http_message(case: str, body: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest) as over_grpc:
        grpc_parse(body)
    assert message in over_grpc.value.message
    assert status_code_for(over_grpc.value) == grpc.StatusCode.INVALID_ARGUMENT
    if case != "request_id missing":  # JSON can say "no request_id"; proto3 cannot tell it from 0
        with pytest.raises(BadRequest) as over_http:
            http_parse(body)
        assert over_grpc.value.message == over_http.value.message


@pytest.mark.parametrize(
    "body",
    [
        VALID,
        {"request_id": -9, "seq_len": 0},  # seq_len 0 set explicitly is valid, as in JSON
        {
            "request_id": 2**63 - 1,
            "seq_len": 64,
            "block_cache_keys": [-(2**63), 0, 2**63 - 1],
            "generate_timeout": 1,
            "model": "engine_service",
            "request_time_ms": 0,
        },
        {**VALID, "model": ""},  # an empty model name is a name (then refused as unknown), not "no model"
    ],
)
def test_valid_requests_parse_as_their_json(body: dict[str, object]) -> None:
    assert grpc_parse(body) == http_parse(body)


def test_defaults_are_the_json_defaults() -> None:
    parsed = grpc_parse({"request_id": 1, "seq_len": 5})
    assert parsed.generate_timeout_ms == 3_600_000
    assert (parsed.model, parsed.request_time_ms, parsed.block_cache_keys) == (None, None, ())


def test_release_fields() -> None:
    assert release_fields(ReleaseRequestPB(request_id=4)) == {"request_id": 4}
    assert release_fields(ReleaseRequestPB(request_id=4, model="m")) == {"request_id": 4, "model": "m"}
    with pytest.raises(BadRequest, match="request_id: must not be 0"):
        parse_request_id(release_fields(ReleaseRequestPB()))


def test_unknown_model_is_not_found() -> None:
    exc = BadRequest("unknown model 'x'", status=404, code=ErrorCode.UNKNOWN_MODEL)
    assert status_code_for(exc) == grpc.StatusCode.NOT_FOUND


def choice(role: Role, port: int, **status: object) -> Choice:
    spec = WorkerSpec("10.0.0.9", port, role, group="g2", max_concurrency=4)
    view = WorkerView(
        spec, WorkerStatus(kv_total=10_000, kv_used=1_000, step_latency_ms=12.5, **status), 2, 300, hit_blocks=3
    )  # type: ignore[arg-type]
    return Choice(view, estimate_ttft_ms=18.2456, reserve_tokens=300)


@pytest.mark.parametrize("degraded", [False, True])
def test_a_success_reply_is_the_http_body_field_for_field(degraded: bool) -> None:
    result = ScheduleResult(
        success=True,
        choices={Role.DECODE: choice(Role.DECODE, 8010), Role.PREFILL: choice(Role.PREFILL, 8000, running=2)},
        degraded=degraded,
    )
    body = schedule_body(result, 2**62, master_host="10.0.0.1:7001")

    reply = schedule_response_pb(body)

    # every key wire.py writes, nested ones included, has its field (a missing one would raise above), and back
    assert to_json(reply) == body
    assert [s.role for s in reply.server_status] == ["DECODE", "PREFILL"]
    assert reply.server_status[1].debug_info.hit_cache_len == 3 * 64


@pytest.mark.parametrize("waited_ms", [47.46, 47.44, 0.05, 12.0])
def test_a_queued_requests_two_wait_fields_agree(waited_ms: float) -> None:
    explained = dataclasses.replace(choice(Role.PREFILL, 8000), explanation={"reason": "x"})
    result = ScheduleResult(success=True, choices={Role.PREFILL: explained}, queue=QueueStay(waited_ms, 1, 2))
    info = schedule_body(result, 1, master_host=None)["server_status"][0]["debug_info"]
    assert info["waiting_time_ms"] == round(info["queue"]["waited_ms"])  # 47.46 was 47 and 47.5 (-> 48)


@pytest.mark.parametrize(
    "code", [ErrorCode.NO_PREFILL_WORKER, ErrorCode.QUEUE_FULL, ErrorCode.STATE_UNAVAILABLE, ErrorCode.QUEUE_TIMEOUT]
)
def test_a_refusal_is_a_reply_with_the_http_code(code: ErrorCode) -> None:
    result = ScheduleResult(success=False, code=code, message=f"{code.name}: why")
    body = schedule_body(result, 5, master_host="10.0.0.1:7001")

    reply = schedule_response_pb(body)

    assert to_json(reply) == {**body, "degraded": False}  # the JSON refusal has no "degraded": false is its meaning
    assert reply.success is False and reply.code == int(code) and reply.error_message == f"{code.name}: why"
    assert not reply.HasField("queue_length")  # null in JSON
    assert list(reply.server_status) == []


def test_a_reply_refuses_a_key_it_has_no_field_for() -> None:
    """A field added to the HTTP body fails loudly (here and in every gRPC test) until the .proto has it."""
    body = schedule_body(ScheduleResult(success=False, code=ErrorCode.NO_DECODE_WORKER), 1, master_host=None)
    with pytest.raises(ValueError, match="new_field"):
        schedule_response_pb({**body, "new_field": 1})


def test_release_reply() -> None:
    body = {"success": True, "code": 200, "request_id": -8, "released": 2}
    assert to_json(release_response_pb(body)) == body
