"""The worker status protocol is wire compatible with RTP-LLM, and the committed generated code is current.

The wire tests encode by hand, from the field numbers of FLEXLB_REFERENCE.md ("Worker status RPCs"), without the
generated classes: a wrong field number or type in protos/flexlb_worker.proto makes them fail.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from flexlb.proto import flexlb_worker_pb2 as pb
from flexlb.proto import flexlb_worker_pb2_grpc as pb_grpc

# --- a minimal protobuf encoder -------------------------------------------------------------------------------------

VARINT, FIXED64, LENGTH_DELIMITED = 0, 1, 2


def varint(value: int) -> bytes:
    """Base-128 varint; a negative int32/int64 is its 64-bit two's complement (10 bytes), as protobuf encodes it."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def int_field(field: int, value: int | bool) -> bytes:
    """int32, int64 and bool: plain varints (not zigzag)."""
    return tag(field, VARINT) + varint(int(value))


def double_field(field: int, value: float) -> bytes:
    return tag(field, FIXED64) + struct.pack("<d", value)


def bytes_field(field: int, payload: bytes) -> bytes:
    """Strings, submessages and map entries."""
    return tag(field, LENGTH_DELIMITED) + varint(len(payload)) + payload


def string_field(field: int, value: str) -> bytes:
    return bytes_field(field, value.encode())


# --- the messages, as the reference numbers them ------------------------------------------------------------------

TASKS = [
    # request_id, prefix_length, input_length, waiting_time_ms, iterate_count, end_time_ms, dp_rank, is_waiting
    (2**62 + 5, 128, 2048, 35, 7, 0, 1, False),  # request ids are 64-bit: beyond 32 bits on purpose
    (-17, 0, 512, 1200, 0, 0, 0, True),  # a negative id still round-trips (10-byte varint)
]
FINISHED = [(901, 64, 1000, 3, 250, 1_700_000_000_123, 0, False)]


def task_info(values: tuple[int, int, int, int, int, int, int, bool]) -> bytes:
    request_id, prefix, input_len, waiting_ms, iterations, end_ms, dp_rank, is_waiting = values
    # Field 2 is reserved (RTP-LLM's former inter_request_id): nothing is sent with that number.
    return (
        int_field(1, request_id)
        + int_field(3, prefix)
        + int_field(4, input_len)
        + int_field(5, waiting_ms)
        + int_field(6, iterations)
        + int_field(7, end_ms)
        + int_field(8, dp_rank)
        + int_field(9, is_waiting)
    )


def worker_status_bytes() -> bytes:
    return (
        string_field(1, "RoleType.PREFILL")
        + int_field(2, -2)  # negative int32: sign-extended to 10 bytes on the wire
        + b"".join(bytes_field(3, task_info(t)) for t in TASKS)
        + b"".join(bytes_field(4, task_info(t)) for t in FINISHED)
        + int_field(5, 4)
        + int_field(6, 9)
        + double_field(7, 23.75)
        + int_field(8, 123_456)
        + int_field(9, 2)
        + int_field(10, 8)
        # 11 is not used by RTP-LLM
        + int_field(12, 4_000_000_001)
        + int_field(13, True)
        + string_field(14, "fp8")
        + int_field(15, 1_700_000_000_123)
        + int_field(16, 1)
        + int_field(17, 300_000)
        + int_field(18, 1_048_576)
    )


def assert_task(task: pb.TaskInfoPB, values: tuple[int, int, int, int, int, int, int, bool]) -> None:
    got = (
        task.request_id,
        task.prefix_length,
        task.input_length,
        task.waiting_time_ms,
        task.iterate_count,
        task.end_time_ms,
        task.dp_rank,
        task.is_waiting,
    )
    assert got == values


def test_worker_status_decodes_every_field() -> None:
    status = pb.WorkerStatusPB.FromString(worker_status_bytes())

    assert status.role == "RoleType.PREFILL"
    assert status.available_concurrency == -2
    assert len(status.running_task_info) == len(TASKS)
    for task, values in zip(status.running_task_info, TASKS, strict=True):
        assert_task(task, values)
    assert len(status.finished_task_list) == len(FINISHED)
    for task, values in zip(status.finished_task_list, FINISHED, strict=True):
        assert_task(task, values)
    assert status.waiting_query_len == 4
    assert status.running_query_len == 9
    assert status.step_latency_ms == 23.75
    assert status.iterate_count == 123_456
    assert status.dp_size == 2
    assert status.tp_size == 8
    assert status.status_version == 4_000_000_001
    assert status.alive is True
    assert status.precision == "fp8"
    assert status.latest_finished_version == 1_700_000_000_123
    assert status.dp_rank == 1
    assert status.available_kv_cache == 300_000
    assert status.total_kv_cache == 1_048_576
    # Nothing landed in an unknown field: every number above is one flexlb declares, with the same wire type.
    assert len(UnknownFieldSet(status)) == 0
    assert all(len(UnknownFieldSet(task)) == 0 for task in [*status.running_task_info, *status.finished_task_list])


def test_newer_worker_fields_are_ignored() -> None:
    """A current RTP-LLM worker sends fields flexlb does not declare (TaskInfoPB 10+, WorkerStatusPB 19+)."""
    newer_task = task_info(TASKS[0]) + bytes_field(10, int_field(1, 8429)) + int_field(12, 3)
    data = (
        string_field(1, "RoleType.DECODE")
        + bytes_field(3, newer_task)
        + int_field(13, True)
        + int_field(20, 2)  # role_type
        + int_field(21, 32_768)  # max_seq_len
        + int_field(17, 5)
    )
    status = pb.WorkerStatusPB.FromString(data)
    assert status.role == "RoleType.DECODE"
    assert_task(status.running_task_info[0], TASKS[0])
    assert status.alive is True
    assert status.available_kv_cache == 5


def test_cache_status_decodes_every_field() -> None:
    # map<int64, bool> entries are repeated submessages {key = 1; value = 2}. Block keys are 64-bit hashes, so
    # negative keys are common; an encoder may write a false value explicitly or omit it.
    entries = [
        (int_field(1, -6_917_529_027_641_081_856) + int_field(2, True), -6_917_529_027_641_081_856, True),
        (int_field(1, 42) + int_field(2, False), 42, False),
        (int_field(1, 2**63 - 1), 2**63 - 1, False),
        (int_field(1, 7) + int_field(2, True), 7, True),
    ]
    data = (
        int_field(1, 1_000)
        + int_field(2, 65_536)
        + int_field(3, 64)
        + int_field(4, 77)
        + b"".join(bytes_field(5, entry) for entry, _, _ in entries)
    )

    cache = pb.CacheStatusPB.FromString(data)

    assert cache.available_kv_cache == 1_000
    assert cache.total_kv_cache == 65_536
    assert cache.block_size == 64
    assert cache.version == 77
    assert dict(cache.cache_keys) == {key: value for _, key, value in entries}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            pb.StatusVersionPB(latest_cache_version=5, latest_finished_version=1_700_000_000_123),
            int_field(1, 5) + int_field(2, 1_700_000_000_123),
        ),
        (pb.StatusVersionPB(latest_finished_version=9), int_field(2, 9)),  # proto3 omits zero fields
        (pb.CacheVersionPB(latest_cache_version=-1, need_cache_keys=True), int_field(1, -1) + int_field(2, True)),
        (pb.CacheVersionPB(latest_cache_version=300), int_field(1, 300)),
    ],
)
def test_requests_encode_as_rtp_llm_expects(message: object, expected: bytes) -> None:
    assert message.SerializeToString() == expected  # type: ignore[attr-defined]


def test_method_paths_match_rtp_llm() -> None:
    """RTP-LLM's model_rpc_service.proto has no package, so its methods live at /RpcService/<name>."""

    class PathRecorder:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, *args: object, **kwargs: object) -> None:
            self.paths.append(path)

    channel = PathRecorder()
    pb_grpc.RpcServiceStub(channel)
    assert channel.paths == ["/RpcService/GetWorkerStatus", "/RpcService/GetCacheStatus"]
    assert pb.DESCRIPTOR.package == ""


# --- the committed generated code is current -----------------------------------------------------------------------


def test_every_proto_has_its_generated_code() -> None:
    from flexlb.proto import generate

    assert sorted(p.name for p in generate.PROTO_DIR.glob("*.proto")) == sorted(generate.PROTO_FILES)
    assert generate.GENERATED_FILES == (
        "flexlb_worker_pb2.py",
        "flexlb_worker_pb2.pyi",
        "flexlb_worker_pb2_grpc.py",
        "flexlb_schedule_pb2.py",
        "flexlb_schedule_pb2.pyi",
        "flexlb_schedule_pb2_grpc.py",
    )


def test_generated_code_is_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (it is in the test extra): cannot regenerate to compare")
    from flexlb.proto import generate

    generate.generate(out_dir=tmp_path)

    stale = [
        name
        for name in generate.GENERATED_FILES
        if (tmp_path / name).read_bytes() != (generate.PACKAGE_DIR / name).read_bytes()
    ]
    assert not stale, (
        f"{', '.join(stale)} differ from {', '.join(generate.PROTO_FILES)} in protos/: run"
        " `python -m flexlb.proto.generate` "
        f"(with grpcio-tools {_committed_grpc_version()}, the version the committed code was generated with)"
    )


def _committed_grpc_version() -> str:
    for line in (Path(pb_grpc.__file__)).read_text().splitlines():
        if line.startswith("GRPC_GENERATED_VERSION"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "?"
