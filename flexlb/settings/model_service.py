"""MODEL_SERVICE_CONFIG: the model service (its id, part of every Redis key) and its statically listed workers, in
both of the original's forms (``*_endpoint`` at the top level, or ``role_endpoints`` by group), and FLEXLB_SERVICE_ID.
An unknown key is an error naming the closest known one; the original's keys that flexlb ignores are warned about."""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from flexlb.domain import EngineKind, Role, WorkerSpec
from flexlb.kv_events.endpoint import KvEventsEndpoint, kv_events_endpoint
from flexlb.settings.common import (
    ConfigError,
    _blank,
    _check_range,
    _from_json,
    _load_json,
    _show,
    _squash,
)

# Every part logs as "flexlb.settings", the one logger of the configuration (operators and tests filter on it).
log = logging.getLogger("flexlb.settings")


@dataclass(frozen=True, slots=True)
class StaticWorker:
    """A worker listed in MODEL_SERVICE_CONFIG."""

    ip: str
    http_port: int
    role: Role
    group: str = ""
    engine: EngineKind = EngineKind.RTP_LLM
    grpc_port: int = 0  # the endpoint's worker_status_port; 0: http_port + 1
    kv_events: KvEventsEndpoint | None = None  # where it publishes KV events (the master subscribes); None: none

    @property
    def worker_id(self) -> str:
        return f"{self.ip}:{self.http_port}"

    def to_spec(self) -> WorkerSpec:
        return WorkerSpec(
            ip=self.ip,
            http_port=self.http_port,
            role=self.role,
            group=self.group,
            engine=self.engine,
            grpc_port=self.grpc_port,
            kv_events=self.kv_events,  # routers see which workers report their cache exactly
        )


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The model service: its id (part of every Redis key) and its statically listed workers."""

    service_id: str = "default"
    endpoints: tuple[StaticWorker, ...] = ()

    @property
    def roles(self) -> tuple[Role, ...]:
        """Roles that have at least one listed worker, in ``Role`` order."""
        present = {w.role for w in self.endpoints}
        return tuple(r for r in Role if r in present)


SERVICE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENDPOINT_KEYS: Final[Mapping[str, Role]] = {
    "prefill_endpoint": Role.PREFILL,
    "decode_endpoint": Role.DECODE,
    "vit_endpoint": Role.VIT,
    "pd_fusion_endpoint": Role.PDFUSION,
}
_SUPPORTED_ENDPOINT_TYPES: Final = frozenset({"SPECIFIEDIPPORTLIST", "SPECIFIEDIPPORT"})  # squashed
# Keys of each level of MODEL_SERVICE_CONFIG; any other key is an error naming the closest of these (a typo such as
# "prefil_endpoint" would otherwise start a router with no workers). Keys of the original flexlb ignores: warned.
_ENDPOINT_FIELDS: Final = frozenset(
    {"address", "protocol", "path", "type", "engine", "worker_status_port", "kv_events", "kv_events_replay"}
)
_ENTRY_FIELDS: Final = frozenset({"group", *_ENDPOINT_KEYS})
_TOP_FIELDS: Final = frozenset({"service_id", "role_endpoints", *_ENDPOINT_KEYS})
_IGNORED_SERVICE_KEYS: Final[Mapping[str, str]] = {
    "multi_engine_num": "flexlb schedules each listed ip:port as one worker",
    "discovery": "flexlb reads the workers listed in address (register others with `flexlb worker add`)",
    "kvcm": "flexlb reads KV cache state from the workers",
    "optimizer": "flexlb has no external optimizer",
}


def _check_keys(raw: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Refuse a key that is not in ``known`` (warn for the original's ignored ones), naming the closest known key."""
    for key in raw:
        if key in known:
            continue
        path = f"{where}.{key}"
        if key in _IGNORED_SERVICE_KEYS:
            log.warning(
                "%s is an option of the original FlexLB that flexlb ignores: %s", path, _IGNORED_SERVICE_KEYS[key]
            )
            continue
        near = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{path}: unknown key{hint} (known here: {', '.join(sorted(known))})")


def _host_port(item: str, where: str) -> tuple[str, int]:
    """Split ``ip:port`` (or ``[v6]:port``) and check both parts."""
    text = item.strip()
    if text.lower().startswith("http://"):  # a worker URL (as smg and vllm-router take them): its host:port
        text = text[len("http://") :].rstrip("/")
    if "://" in text:
        raise ConfigError(f'{where}: {_show(item)} has no valid host (expected "ip:port", without a scheme)')
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f'{where}: {_show(item)}: write an IPv6 address as "[address]:port"')
    if not sep:
        raise ConfigError(
            f'{where}: {_show(item)} has no port (expected "ip:port"; a DNS name is fine, e.g. "worker-0.svc:8000",'
            " resolved at start-up and again every 10 s)"
        )
    if not host or re.search(r"[\s/{}\[\]]", host):
        raise ConfigError(f'{where}: {_show(item)} has no valid host (expected "ip:port")')
    if not re.fullmatch(r"[0-9]+", port):
        raise ConfigError(f"{where}: port {_show(port)} of {_show(item)} is not an integer")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{where}: port {number} of {_show(item)} is out of range (1-65535)")
    return host, number


def _addresses(raw: object, where: str) -> list[tuple[str, int]]:
    """``"[\\"ip:port\\", ...]"`` (a JSON array in a string, as the original), a JSON list, or ``"ip:port"``."""
    items: object = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not a JSON array of addresses: {exc.msg} (char {exc.pos})") from None
        else:
            items = [part for part in text.split(",") if part.strip()]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f'{where}: expected "ip:port", a list of them or a JSON array in a string, got {_show(raw)}')
    if not items:
        raise ConfigError(f"{where}: no addresses listed")
    return [_host_port(i, where) for i in items]


def _endpoint(raw: object, where: str, role: Role, group: str) -> list[StaticWorker]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object with address, protocol, path and type, got {_show(raw)}")
    kind = raw.get("type")
    if kind is not None and not (isinstance(kind, str) and _squash(kind) in _SUPPORTED_ENDPOINT_TYPES):
        raise ConfigError(
            f"{where}.type: endpoint type {_show(kind)} is not supported by flexlb (only SpecifiedIpPortList);"
            " list the workers' ip:port here, or register workers with `flexlb worker add` instead"
        )
    _check_keys(raw, _ENDPOINT_FIELDS, where)
    if "address" not in raw:
        raise ConfigError(f"{where}.address: missing")
    addresses = _addresses(raw["address"], f"{where}.address")
    status_port = raw.get("worker_status_port")
    if status_port is not None:  # the original's: the port of the workers' status gRPC, instead of http_port + 1
        status_port = _from_json(status_port, int, f"{where}.worker_status_port")
        _check_range(status_port, f"{where}.worker_status_port", 1, 65535, False)
    engine = raw.get("engine", EngineKind.RTP_LLM.value)
    try:
        kind = EngineKind.parse(engine) if isinstance(engine, str) else None
    except ValueError:
        kind = None
    if kind is None:
        choices = ", ".join(f'"{k.value}"' for k in EngineKind)
        raise ConfigError(f"{where}.engine: expected one of {choices}, got {_show(engine)}")
    return [
        StaticWorker(
            ip=host,
            http_port=port,
            role=role,
            group=group,
            engine=kind,
            grpc_port=int(status_port or 0),
            kv_events=_kv_events(raw, host, f"{where}.kv_events", single=len(addresses) == 1),
        )
        for host, port in addresses
    ]


def _kv_events(raw: Mapping[str, Any], host: str, where: str, *, single: bool) -> KvEventsEndpoint | None:
    if raw.get("kv_events") is None:
        return None
    try:
        return kv_events_endpoint(raw["kv_events"], raw.get("kv_events_replay"), host, where, single=single)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _endpoints_of(entry: dict[str, Any], where: str, group: str) -> list[tuple[StaticWorker, str]]:
    out = []
    for key, role in _ENDPOINT_KEYS.items():
        if entry.get(key) is not None:
            path = f"{where}.{key}" if where else key
            out += [(w, path) for w in _endpoint(entry[key], f"MODEL_SERVICE_CONFIG.{path}", role, group)]
    return out


def _service_id(document: dict[str, Any], environ: Mapping[str, str]) -> str:
    if not _blank(environ.get("FLEXLB_SERVICE_ID")):
        value: object = environ["FLEXLB_SERVICE_ID"].strip()
        where = "FLEXLB_SERVICE_ID (environment)"
    else:
        value = document.get("service_id", "default")
        where = "MODEL_SERVICE_CONFIG.service_id"
    if not isinstance(value, str) or not SERVICE_ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{where}: {_show(value)} is not a valid service id: 1 to 64 letters, digits, '_', '.' or '-'"
            " (it becomes part of Redis key names)"
        )
    return value


def parse_service_config(environ: Mapping[str, str]) -> ServiceConfig:
    """MODEL_SERVICE_CONFIG (both forms) and FLEXLB_SERVICE_ID from ``environ``."""
    document = {} if _blank(environ.get("MODEL_SERVICE_CONFIG")) else _load_json(environ, "MODEL_SERVICE_CONFIG")
    if not isinstance(document, dict):
        raise ConfigError(f"MODEL_SERVICE_CONFIG: expected a JSON object, got {_show(document)}")
    _check_keys(document, _TOP_FIELDS, "MODEL_SERVICE_CONFIG")
    service_id = _service_id(document, environ)

    # Older form: *_endpoint at the top level, one implicit group. Both forms may appear together.
    found = _endpoints_of(document, "", "")
    entries = document.get("role_endpoints")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise ConfigError(f"MODEL_SERVICE_CONFIG.role_endpoints: expected a list, got {_show(entries)}")
    for i, entry in enumerate(entries):
        where = f"role_endpoints[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"MODEL_SERVICE_CONFIG.{where}: expected an object, got {_show(entry)}")
        _check_keys(entry, _ENTRY_FIELDS, f"MODEL_SERVICE_CONFIG.{where}")
        group = entry.get("group", "")
        if not isinstance(group, str):
            raise ConfigError(f"MODEL_SERVICE_CONFIG.{where}.group: expected a string, got {_show(group)}")
        found += _endpoints_of(entry, where, group)

    # ip:port is a worker's key in Redis, so one worker can appear once, with one role.
    seen: dict[str, str] = {}
    for worker, path in found:
        if worker.worker_id in seen:
            raise ConfigError(
                f"MODEL_SERVICE_CONFIG.{path}.address: {worker.worker_id} is already listed in"
                f" {seen[worker.worker_id]}; a worker (ip:port) can be listed once, with one role"
            )
        seen[worker.worker_id] = path
    return ServiceConfig(service_id=service_id, endpoints=tuple(w for w, _ in found))
