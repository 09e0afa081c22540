"""Ports handed to child processes stay out of the range the kernel gives outgoing connections."""

from __future__ import annotations

import random
import socket

from flexlb.ports import ephemeral_range, free_port, free_port_pair, free_ports


def test_a_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    low, _ = ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert port < low  # an outgoing connection cannot take it before the child binds it
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the children bind: TIME_WAIT is free
            sock.bind(("127.0.0.1", port))


def test_a_free_pair_is_two_adjacent_bindable_ports_below_the_range() -> None:
    low, _ = ephemeral_range()
    for _ in range(20):
        port = free_port_pair()
        assert port + 1 < low
        with socket.socket() as http, socket.socket() as grpc_:
            for sock in (http, grpc_):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            http.bind(("127.0.0.1", port))
            grpc_.bind(("127.0.0.1", port + 1))


def test_a_port_in_use_is_never_handed_out(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr("flexlb.ports.random.Random", lambda: _Always(port))
        got = free_port()  # every candidate is the taken port: the kernel picks instead
        assert got != port


class _Always:
    def __init__(self, port: int) -> None:
        self.port = port

    def randrange(self, low: int, high: int) -> int:
        return self.port


def test_a_range_handed_out_is_not_handed_out_again_before_it_is_bound(monkeypatch) -> None:
    base = free_ports(64)  # a simulated fleet's ports, its process still starting: nothing bound yet
    real = random.Random()
    inside = iter([base, base + 10, base + 63])  # bindable, but handed out: the next picks must pass them over
    monkeypatch.setattr("flexlb.ports.random.Random", lambda: _First(inside, real))
    port = free_port()
    assert not base <= port < base + 64


class _First:
    def __init__(self, ports, then: random.Random) -> None:
        self.ports, self.then = ports, then

    def randrange(self, low: int, high: int) -> int:
        return next(self.ports, None) or self.then.randrange(low, high)
