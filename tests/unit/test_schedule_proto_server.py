"""The gRPC schedule API's server: a port in use is refused clearly unless the processes sharing it are siblings of
one ``flexlb serve --processes N``, and a port claimed by a router that never finished starting is given back."""

from __future__ import annotations

import socket

import pytest

from flexlb.grpc_api.server import GrpcPortUnavailable, GrpcScheduleApi, shares_port_with_siblings
from flexlb.settings import FlexlbConfig


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_a_port_in_use_is_refused_naming_the_option() -> None:
    first = GrpcScheduleApi("127.0.0.1", 0)
    claim = first.bind(None)  # type: ignore[arg-type]  # bind does not use the app
    await anext(claim)
    assert first.port
    try:
        second = GrpcScheduleApi("127.0.0.1", first.port)
        with pytest.raises(GrpcPortUnavailable) as refused:
            await anext(second.bind(None))  # type: ignore[arg-type]
        assert str(refused.value) == (
            "grpcPort / grpcHost: the gRPC schedule API (enableGrpcPrefillMaster) cannot listen on"
            f" 127.0.0.1:{first.port}: Address already in use. Choose another grpcPort (0 = any free port) or grpcHost."
        )
    finally:
        port = first.port
        with pytest.raises(StopAsyncIteration):
            await anext(claim)  # the clean-up of a server that never served
    assert first.port is None and port_is_free(port)


async def test_sibling_processes_share_the_port() -> None:
    first = GrpcScheduleApi("127.0.0.1", 0, reuse_port=True)
    await anext(first.bind(None))  # type: ignore[arg-type]
    second = GrpcScheduleApi("127.0.0.1", first.port or 0, reuse_port=True)
    await anext(second.bind(None))  # type: ignore[arg-type]
    assert second.port == first.port
    await second.stop()
    await first.stop()
    await first.stop()  # idempotent


def test_siblings_are_the_children_of_flexlb_serve_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shares_port_with_siblings({"PROMETHEUS_MULTIPROC_DIR": "/tmp/flexlb-metrics-x"})
    assert not shares_port_with_siblings({})
    assert not shares_port_with_siblings({"PROMETHEUS_MULTIPROC_DIR": " "})
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    config = FlexlbConfig(enable_grpc_prefill_master=True, grpc_host="127.0.0.1", grpc_port=9)
    api = GrpcScheduleApi.from_config(config)
    assert (api.host, api.requested_port, api.reuse_port) == ("127.0.0.1", 9, False)
    assert GrpcScheduleApi.from_config(config, reuse_port=True).reuse_port
