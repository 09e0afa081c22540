"""flexlb's gRPC schedule API (protos/flexlb_schedule.proto) keeps its wire format: field numbers, types, presence,
package and method paths.

As in test_proto_wire.py, the messages are encoded by hand from the numbers a client compiled against flexlb.v1
uses, without the generated classes: renumbering or retyping a field in the .proto makes these tests fail. (The
committed generated code being current is checked by test_proto_wire.py for both .proto files.)
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet
from test_proto_wire import bytes_field, double_field, int_field, string_field, varint

from flexlb.proto import flexlb_schedule_pb2 as pb
from flexlb.proto import flexlb_schedule_pb2_grpc as pb_grpc

T = FieldDescriptor
# message -> [(field, number, type, repeated, explicit presence)]: the API as released. Append; never edit a row.
FIELDS: dict[str, list[tuple[str, int, int, bool, bool]]] = {
    "ScheduleRequestPB": [
        ("request_id", 1, T.TYPE_INT64, False, False),
        ("seq_len", 2, T.TYPE_INT64, False, True),
        ("block_cache_keys", 3, T.TYPE_INT64, True, False),
        ("generate_timeout", 4, T.TYPE_INT64, False, True),
        ("model", 5, T.TYPE_STRING, False, True),
        ("request_time_ms", 6, T.TYPE_INT64, False, True),
    ],
    "DebugInfoPB": [
        ("running_batch_size", 1, T.TYPE_INT64, False, False),
        ("queue_size", 2, T.TYPE_INT64, False, False),
        ("waiting_time_ms", 3, T.TYPE_INT64, False, False),
        ("available_kv_cache_len", 4, T.TYPE_INT64, False, False),
        ("estimate_ttft_ms", 5, T.TYPE_DOUBLE, False, False),
        ("estimate_tpot_ms", 6, T.TYPE_DOUBLE, False, False),
        ("hit_cache_len", 7, T.TYPE_INT64, False, False),
        ("reserved_tokens", 8, T.TYPE_INT64, False, False),
        ("degraded", 9, T.TYPE_BOOL, False, False),
    ],
    "ServerStatusPB": [
        ("role", 1, T.TYPE_STRING, False, False),
        ("server_ip", 2, T.TYPE_STRING, False, False),
        ("http_port", 3, T.TYPE_INT32, False, False),
        ("grpc_port", 4, T.TYPE_INT32, False, False),
        ("group", 5, T.TYPE_STRING, False, False),
        ("request_id", 6, T.TYPE_INT64, False, False),
        ("prefill_time", 7, T.TYPE_INT64, False, False),
        ("success", 8, T.TYPE_BOOL, False, False),
        ("code", 9, T.TYPE_INT32, False, False),
        ("message", 10, T.TYPE_STRING, False, False),
        ("debug_info", 11, T.TYPE_MESSAGE, False, True),
    ],
    "ScheduleResponsePB": [
        ("server_status", 1, T.TYPE_MESSAGE, True, False),
        ("success", 2, T.TYPE_BOOL, False, False),
        ("code", 3, T.TYPE_INT32, False, False),
        ("error_message", 4, T.TYPE_STRING, False, False),
        ("real_master_host", 5, T.TYPE_STRING, False, True),
        ("queue_length", 6, T.TYPE_INT64, False, True),
        ("degraded", 7, T.TYPE_BOOL, False, False),
    ],
    "ReleaseRequestPB": [
        ("request_id", 1, T.TYPE_INT64, False, False),
        ("model", 2, T.TYPE_STRING, False, True),
    ],
    "ReleaseResponsePB": [
        ("success", 1, T.TYPE_BOOL, False, False),
        ("code", 2, T.TYPE_INT32, False, False),
        ("request_id", 3, T.TYPE_INT64, False, False),
        ("released", 4, T.TYPE_INT64, False, False),
    ],
}


@pytest.mark.parametrize("message", list(FIELDS))
def test_fields_keep_their_numbers_types_and_presence(message: str) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    got = [(f.name, f.number, f.type, f.is_repeated, f.has_presence and not f.is_repeated) for f in descriptor.fields]
    assert got == FIELDS[message]


def test_package_messages_and_method_paths() -> None:
    assert pb.DESCRIPTOR.package == "flexlb.v1"
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(FIELDS)

    class PathRecorder:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, *args: object, **kwargs: object) -> None:
            self.paths.append(path)

    channel = PathRecorder()
    pb_grpc.FlexlbSchedulerStub(channel)
    assert channel.paths == ["/flexlb.v1.FlexlbScheduler/Schedule", "/flexlb.v1.FlexlbScheduler/Release"]


def packed(field: int, values: list[int]) -> bytes:
    """A packed repeated varint field (proto3's default for repeated scalars)."""
    return bytes_field(field, b"".join(varint(v) for v in values))


KEYS = [-6_917_529_027_641_081_856, 0, 42, 2**63 - 1]  # 64-bit hashes: negative ones are common


def test_schedule_request_encodes_with_its_numbers() -> None:
    request = pb.ScheduleRequestPB(
        request_id=2**62 + 5,
        seq_len=300,
        block_cache_keys=KEYS,
        generate_timeout=5_000,
        model="engine_service",
        request_time_ms=1_700_000_000_123,
    )
    expected = (
        int_field(1, 2**62 + 5)
        + int_field(2, 300)
        + packed(3, KEYS)
        + int_field(4, 5_000)
        + string_field(5, "engine_service")
        + int_field(6, 1_700_000_000_123)
    )
    assert request.SerializeToString() == expected


def test_optional_fields_set_to_zero_are_sent_and_unset_ones_are_not() -> None:
    """Presence is what lets the server tell `seq_len: 0` from a missing seq_len, as the JSON API does."""
    assert pb.ScheduleRequestPB(request_id=7, seq_len=0).SerializeToString() == int_field(1, 7) + int_field(2, 0)
    assert pb.ScheduleRequestPB(request_id=7).SerializeToString() == int_field(1, 7)
    decoded = pb.ScheduleRequestPB.FromString(int_field(1, 7) + int_field(4, 0))
    assert decoded.HasField("generate_timeout") and not decoded.HasField("seq_len")


def test_a_client_encoding_keys_unpacked_is_understood() -> None:
    """proto2-style encoders send repeated int64 one tag per value; parsers must accept both forms."""
    data = int_field(1, 9) + b"".join(int_field(3, k) for k in KEYS)
    assert list(pb.ScheduleRequestPB.FromString(data).block_cache_keys) == KEYS


def debug_info_bytes() -> bytes:
    return (
        int_field(1, 3)
        + int_field(2, 5)
        + int_field(3, 0)
        + int_field(4, 98_000)
        + double_field(5, 18.2)
        + double_field(6, 11.5)
        + int_field(7, 256)
        + int_field(8, 300)
        + int_field(9, True)
    )


def server_status_bytes(role: str) -> bytes:
    return (
        string_field(1, role)
        + string_field(2, "10.0.0.7")
        + int_field(3, 8000)
        + int_field(4, 8001)
        + string_field(5, "g1")
        + int_field(6, -17)
        + int_field(7, 18)
        + int_field(8, True)
        + int_field(9, 200)
        + string_field(10, "ok")
        + bytes_field(11, debug_info_bytes())
    )


def test_schedule_response_decodes_every_field() -> None:
    data = (
        bytes_field(1, server_status_bytes("PREFILL"))
        + bytes_field(1, server_status_bytes("DECODE"))
        + int_field(2, True)
        + int_field(3, 200)
        + string_field(4, "none")
        + string_field(5, "10.0.0.1:7001")
        + int_field(6, 0)
        + int_field(7, True)
    )
    response = pb.ScheduleResponsePB.FromString(data)

    assert [s.role for s in response.server_status] == ["PREFILL", "DECODE"]
    status = response.server_status[0]
    assert (status.server_ip, status.http_port, status.grpc_port, status.group) == ("10.0.0.7", 8000, 8001, "g1")
    assert (status.request_id, status.prefill_time, status.success, status.code) == (-17, 18, True, 200)
    assert status.message == "ok"
    info = status.debug_info
    assert (info.running_batch_size, info.queue_size, info.waiting_time_ms, info.available_kv_cache_len) == (
        3,
        5,
        0,
        98_000,
    )
    assert (info.estimate_ttft_ms, info.estimate_tpot_ms, info.hit_cache_len) == (18.2, 11.5, 256)
    assert (info.reserved_tokens, info.degraded) == (300, True)
    assert (response.success, response.code, response.error_message) == (True, 200, "none")
    assert response.real_master_host == "10.0.0.1:7001"
    assert response.HasField("queue_length") and response.queue_length == 0
    assert response.degraded is True
    messages = [response, *response.server_status, *(s.debug_info for s in response.server_status)]
    assert all(len(UnknownFieldSet(m)) == 0 for m in messages)


def test_release_messages_keep_their_numbers() -> None:
    request = pb.ReleaseRequestPB(request_id=-3, model="svc")
    assert request.SerializeToString() == int_field(1, -3) + string_field(2, "svc")
    data = int_field(1, True) + int_field(2, 200) + int_field(3, -3) + int_field(4, 2)
    response = pb.ReleaseResponsePB.FromString(data)
    assert (response.success, response.code, response.request_id, response.released) == (True, 200, -3, 2)
    assert len(UnknownFieldSet(response)) == 0
