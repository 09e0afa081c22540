"""Claiming a listening port so that a port in use fails the start-up with one clear error.

A router alone listens without SO_REUSEPORT, so a second one on its port is refused by the kernel instead of
silently taking half its connections. The children of one ``flexlb serve --processes N`` share their port with
SO_REUSEPORT; their supervisor first checks the port is free for it alone, then holds a bound (not listening) socket
with SO_REUSEPORT for as long as it runs: the kernel then refuses anyone else's exclusive bind, and another
supervisor's check fails the same way, while no connection is ever queued on the held socket.
"""

from __future__ import annotations

import socket


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
