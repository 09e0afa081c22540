"""Listening ports: picking a free one for a child process, and claiming one so that a port in use fails the
start-up with one clear error.

A router alone listens without SO_REUSEPORT, so a second one on its port is refused by the kernel instead of
silently taking half its connections. The children of one ``flexlb serve --processes N`` share their port with
SO_REUSEPORT; their supervisor first checks the port is free for it alone, then holds a bound (not listening) socket
with SO_REUSEPORT for as long as it runs: the kernel then refuses anyone else's exclusive bind, and another
supervisor's check fails the same way, while no connection is ever queued on the held socket.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports handed out for a child to listen on are drawn from below the kernel's ephemeral range: a port bind(0) picked
# is also where the kernel puts outgoing connections, so in the second between picking it and the child binding it,
# any client connection (redis, HTTP, gRPC) on the machine can take it and the child fails with "address in use".
_FREE_PORT_LOW = 10_000
_FREE_PORT_TRIES = 200
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default; macOS uses 49152-65535, above it


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the children bind: TIME_WAIT is free
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


# Ranges this process handed out lately, [start, end): a port handed out is not bound yet (its child is starting), so
# without this a later pick could land on it (a simulated fleet's thousands of consecutive ports, say)
_HANDED_OUT: list[tuple[int, int]] = []
_HANDED_OUT_KEPT = 4096


def free_ports(count: int, host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port P with P .. P + count - 1 free now, outside the ephemeral range and apart from every range this process
    handed out lately, for children to listen on; OSError when there is none."""
    rng = rng or random.Random()
    low, _ = ephemeral_range()
    high = max(low - count, _FREE_PORT_LOW + 1)
    for _ in range(_FREE_PORT_TRIES):
        base = rng.randrange(_FREE_PORT_LOW, high)
        if any(base < end and start < base + count for start, end in _HANDED_OUT):
            continue
        if all(_bindable(host, port) for port in range(base, base + count)):
            _HANDED_OUT.append((base, base + count))
            del _HANDED_OUT[:-_HANDED_OUT_KEPT]
            return base
    raise OSError(f"no {count} consecutive free ports on {host} between {_FREE_PORT_LOW} and {low}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, outside the ephemeral range, for a child process to listen on."""
    try:
        return free_ports(1, host)
    except OSError:  # nothing free below the range: let the kernel pick
        with socket.socket() as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P + 1 free: a simulated worker serves HTTP on P and its status gRPC on P + 1."""
    return free_ports(2, host)


class PortInUse(OSError):
    """The port cannot be bound; the message names host, port and what to do."""


def _socket(host: str, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous run is not "in use"
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def bind(host: str, port: int, *, reuse_port: bool = False, what: str = "--port") -> socket.socket:
    """A socket bound to ``host``:``port`` (0: a free port); PortInUse when that fails."""
    sock = _socket(host, reuse_port)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = (
            " (another flexlb serve or another program listens there: stop it or choose another port)"
            if exc.errno in (98, 48)  # EADDRINUSE on Linux, macOS
            else ""
        )
        raise PortInUse(f"cannot listen on {host}:{port} ({what}): {reason}{hint}") from None
    return sock


def listen(host: str, port: int, *, backlog: int = 128) -> socket.socket:
    """A router alone: an exclusive listening socket (a second router on the port is refused)."""
    sock = bind(host, port)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def claim_shared(host: str, port: int) -> socket.socket:
    """A supervisor: check ``port`` is free for it alone, then hold it (SO_REUSEPORT, not listening) for its
    children to share; returns the held socket (``getsockname()[1]`` is the port when ``port`` is 0)."""
    with bind(host, port) as probe:
        port = probe.getsockname()[1]
    return bind(host, port, reuse_port=True)
