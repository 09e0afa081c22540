"""Where a worker publishes its KV events, as MODEL_SERVICE_CONFIG says it (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True, slots=True)
class KvEventsEndpoint:
    """A worker's PUB endpoint and, if any, its replay ROUTER endpoint (``tcp://host:port``)."""

    publisher: str
    replay: str | None = None
    topic: str = ""


def _tcp(text: str, where: str) -> tuple[str, int]:
    match = _TCP.fullmatch(text.strip())
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f'{where}: expected "tcp://host:port" (the engine\'s ZMQ endpoint), got {text!r}')
    return match["host"], int(match["port"])


def kv_events_endpoint(
    value: object, replay: object, worker_host: str, where: str, *, single: bool
) -> KvEventsEndpoint:
    """``kv_events``: ``"tcp://host:port"`` (an endpoint listing one worker) or a port (each listed worker's host);
    ``kv_events_replay``: ``"tcp://host:port"``, or false for none; unset: the publisher's port + 1 (vLLM's
    ``tcp://*:5557`` / ``tcp://*:5558`` convention). ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f'{where}: expected "tcp://host:port" or a port number, got {value!r}')
    if isinstance(value, int):
        if not 1 <= value <= 65534:
            raise ValueError(f"{where}: port {value} is out of range (1-65534: the replay socket takes port + 1)")
        host, port = worker_host, value
    else:
        if not single:
            raise ValueError(f'{where}: "tcp://host:port" names one worker\'s events; this endpoint lists several'
                             " (give a port: each worker's host, that port)")  # fmt: skip
        host, port = _tcp(value, where)
    publisher = f"tcp://{host}:{port}"
    if replay is None:
        replay_at: str | None = f"tcp://{host}:{port + 1}"
    elif replay is False or replay == "":
        replay_at = None
    elif isinstance(replay, str):
        replay_host, replay_port = _tcp(replay, where + "_replay")
        replay_at = f"tcp://{replay_host}:{replay_port}"
    else:
        raise ValueError(f'{where}_replay: expected "tcp://host:port" or false, got {replay!r}')
    return KvEventsEndpoint(publisher, replay_at)
