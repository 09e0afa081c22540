"""The light HTTP/2 + gRPC codec (flexlb.master.grpc_lite): HPACK decoding against RFC 7541's examples, framing,
and the light server and client against grpcio, in both directions, over real sockets."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import uvloop

from flexlb.master.grpc_lite import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    HEADERS,
    SETTINGS,
    FrameReader,
    HpackDecoder,
    LiteChannel,
    ProtocolError,
    RpcFailed,
    Unsupported,
    encode_headers,
    encode_int,
    frame,
)
from flexlb.master.worker_client import WorkerStatusClient, WorkerUnreachable
from flexlb.proto.flexlb_worker_pb2 import CacheStatusPB, CacheVersionPB, StatusVersionPB, WorkerStatusPB
from flexlb.proto.flexlb_worker_pb2_grpc import RpcServiceServicer, add_RpcServiceServicer_to_server
from flexlb.sim.grpc_lite_server import start_lite_server


def test_integers_round_trip_rfc7541_c1() -> None:
    assert encode_int(10, 5, 0) == bytes([0b01010])  # C.1.1
    assert encode_int(1337, 5, 0) == bytes([0b11111, 0b10011010, 0b00001010])  # C.1.2
    assert encode_int(42, 8, 0) == bytes([42])  # C.1.3


def test_decoder_follows_the_dynamic_table_rfc7541_c3() -> None:
    d = HpackDecoder()
    first = bytes.fromhex("828684410f7777772e6578616d706c652e636f6d")  # C.3.1
    assert d.decode(first) == [
        (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
    ]  # fmt: skip
    second = bytes.fromhex("828684be58086e6f2d6361636865")  # C.3.2: index 62 is the authority added above
    assert d.decode(second)[-2:] == [(b":authority", b"www.example.com"), (b"cache-control", b"no-cache")]
    third = bytes.fromhex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565")  # C.3.3
    assert d.decode(third)[-2:] == [(b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
    assert d.decode(second)[-1] == (b"cache-control", b"no-cache")  # the table moved on: decoded afresh


def test_huffman_strings_are_unsupported_not_misread() -> None:
    with pytest.raises(Unsupported):
        HpackDecoder().decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))  # RFC 7541 C.4.1
    with pytest.raises(ProtocolError):
        HpackDecoder().decode(bytes([0xFF, 0x80]))  # an index past the tables


def test_encoded_headers_decode_back() -> None:
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    assert HpackDecoder().decode(encode_headers(headers)) == headers


def test_frame_reader_joins_continuations_and_waits_for_whole_frames() -> None:
    block = encode_headers([(b":path", b"/RpcService/GetWorkerStatus"), (b"te", b"trailers")])
    wire = frame(HEADERS, 0, 1, block[:5]) + frame(CONTINUATION, END_HEADERS, 1, block[5:]) + frame(DATA, 1, 1, b"x")
    reader = FrameReader()
    assert reader.feed(wire[:7]) == []
    frames = reader.feed(wire[7:])
    assert [(k, sid) for k, _, sid, _ in frames] == [(HEADERS, 1), (DATA, 1)]
    assert HpackDecoder().decode(frames[0][3])[0] == (b":path", b"/RpcService/GetWorkerStatus")


class Servicer(RpcServiceServicer):
    async def GetWorkerStatus(self, request: StatusVersionPB, context: grpc.aio.ServicerContext) -> WorkerStatusPB:
        return WorkerStatusPB(status_version=request.latest_finished_version + 1, alive=True)

    async def GetCacheStatus(self, request: CacheVersionPB, context: grpc.aio.ServicerContext) -> CacheStatusPB:
        return CacheStatusPB(version=5, cache_keys=dict.fromkeys(range(100_000), True))  # ~1 MB: flow control


async def test_light_client_reads_a_grpcio_server_large_replies_included() -> None:
    server = grpc.aio.server()
    add_RpcServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with WorkerStatusClient(f"127.0.0.1:{port}") as client:
            assert client.transport == "lite"
            for v in (1, 2, 3):  # later calls decode grpcio's dynamic-table references
                assert (await client.get_worker_status(v, deadline_s=5)).status_version == v + 1
            cache = await client.get_cache_status(-1, True, deadline_s=10)
            assert cache.version == 5 and len(cache.cache_keys) == 100_000
            assert client.transport == "lite"  # nothing made it fall back
    finally:
        await server.stop(grace=None)


async def test_grpcio_and_light_clients_read_the_light_server() -> None:
    big = CacheStatusPB(version=9, cache_keys=dict.fromkeys(range(100_000), True)).SerializeToString()
    handlers = {
        "GetWorkerStatus": lambda b: WorkerStatusPB(
            status_version=StatusVersionPB.FromString(b).latest_finished_version * 10
        ).SerializeToString(),
        "GetCacheStatus": lambda b: big,
    }
    server = await start_lite_server("127.0.0.1", 0, handlers)
    port = server.sockets[0].getsockname()[1]
    try:
        for transport in ("grpc", "lite"):
            async with WorkerStatusClient(f"127.0.0.1:{port}", transport=transport) as client:  # type: ignore[arg-type]
                results = await asyncio.gather(*(client.get_worker_status(v, deadline_s=30) for v in range(1, 20)))
                assert [r.status_version for r in results] == [v * 10 for v in range(1, 20)]  # multiplexed
                cache = await client.get_cache_status(0, True, deadline_s=10)
                assert cache.version == 9 and len(cache.cache_keys) == 100_000
        channel = LiteChannel("127.0.0.1", port)
        with pytest.raises(RpcFailed) as caught:
            await channel.call("/RpcService/Nope", b"", 5)
        assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        await channel.close()
    finally:
        server.close()


async def test_a_silent_server_fails_by_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(SETTINGS, 0, 0))  # a server's first frame; then it reads the call and answers nothing
        await reader.read(1 << 20)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with WorkerStatusClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(WorkerUnreachable) as caught:
                async with asyncio.timeout(10):  # only turns a client that ignores its deadline into a failure
                    await client.get_worker_status(0, deadline_s=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.close()


def test_a_call_on_a_connection_closed_under_it_fails_as_unavailable_then_reconnects() -> None:
    uvloop.run(_call_on_a_closed_connection())  # the router's loop: uvloop raises on a write to a closed handle


async def _call_on_a_closed_connection() -> None:
    handlers = {"GetWorkerStatus": lambda b: WorkerStatusPB(status_version=7).SerializeToString()}
    server = await start_lite_server("127.0.0.1", 0, handlers)
    port = server.sockets[0].getsockname()[1]
    channel = LiteChannel("127.0.0.1", port)
    try:
        assert WorkerStatusPB.FromString(await channel.call("/RpcService/GetWorkerStatus", b"", 10)).status_version == 7
        protocol = channel._protocol
        assert protocol is not None and protocol.transport is not None
        protocol.transport.abort()
        await asyncio.sleep(0)  # the handle is closed now: a write to it raises in uvloop
        with pytest.raises(RpcFailed) as caught:
            await protocol.call(channel.header_block("/RpcService/GetWorkerStatus"), b"", 10)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE.value[0]
        # the channel's next call opens a new connection
        assert WorkerStatusPB.FromString(await channel.call("/RpcService/GetWorkerStatus", b"", 10)).status_version == 7
    finally:
        await channel.close()
        server.close()
