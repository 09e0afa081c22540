"""``flexlb worker add|update|remove|list``: worker admin in Redis (writes the same keys as the admin API)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import orjson

from flexlb.cli_options import UsageError
from flexlb.domain import EngineKind, Role, WorkerSpec, check_host
from flexlb.settings import Settings, load_settings
from flexlb.state.store import FleetStore, WorkerNotFound
from flexlb.status_bounds import check_status_text


def register(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="register, update, remove or list workers in Redis")
    worker.add_argument("--redis-url", help="default: REDIS_URL")
    worker.add_argument("--service", help="model service id (default: from MODEL_SERVICE_CONFIG, else 'default')")
    wsub = worker.add_subparsers(dest="worker_cmd", required=True)
    add = wsub.add_parser("add", help="register a worker (or replace its identity)")
    add.add_argument("address", help="ip:http_port")
    add.add_argument("--role", required=True, help="prefill, decode, pdfusion or vit")
    add.add_argument("--grpc-port", type=int, default=0, help="default: http_port + 1")
    add.add_argument("--group", default="")
    add.add_argument("--max-concurrency", type=int, default=0, help="0 = unlimited")
    add.add_argument(
        "--engine",
        default=EngineKind.RTP_LLM.value,
        help="how the master polls it: rtp_llm or sim (status gRPC), vllm or sglang (their HTTP API); default rtp_llm",
    )
    add.add_argument(
        "--kv-events",
        metavar="tcp://HOST:PORT",
        help="where it publishes KV events (vLLM --kv-events-config, SGLang), for the master to subscribe; a port:"
        " on the worker's host (default: none)",
    )
    add.add_argument(
        "--kv-events-replay", metavar="tcp://HOST:PORT", help="its replay socket (default: the publisher's port + 1)"
    )
    add.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="initial status field")
    update = wsub.add_parser("update", help="set status fields, e.g. running=3 kv_used=2048 alive=false")
    update.add_argument("address", help="ip:http_port")
    update.add_argument("fields", nargs="*", metavar="FIELD=VALUE")
    remove = wsub.add_parser("remove", help="remove a worker and its reservations")
    remove.add_argument("address", help="ip:http_port")
    wsub.add_parser("list", help="list workers with status and pending load")
    worker.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_worker_command(args, load_settings()))


def _parse_assignments(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected field=value, got {item!r}")
        try:
            out[name] = check_status_text(name.strip(), value.strip())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return out


def _split_address(address: str) -> tuple[str, int]:
    ip, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected a worker address ip:http_port, got {address!r}")
    try:
        return check_host(ip), int(port)
    except ValueError as exc:
        raise UsageError(f"{address!r}: {exc}") from None


async def _worker_command(args: argparse.Namespace, settings: Settings) -> int:
    from flexlb.app import make_redis

    url = args.redis_url or settings.redis_url
    if url is None:
        raise UsageError("set REDIS_URL (or --redis-url) to the fleet's Redis; `flexlb serve` prints it")
    redis = make_redis(url, settings.flexlb.redis_timeout_ms)
    store = FleetStore(redis, args.service or settings.service.service_id)
    try:
        if args.worker_cmd == "list":
            for view in await store.list_workers():
                s = view.status
                print(
                    f"{view.worker_id:<22} {view.spec.role.value:<8} group={view.spec.group or '-':<6} "
                    f"alive={int(s.alive)} running={s.running} waiting={s.waiting} kv={s.kv_used}/{s.kv_total} "
                    f"pending={view.pending_count} ({view.pending_tokens} tokens)"
                )
            return 0
        if args.worker_cmd == "add":
            ip, port = _split_address(args.address)
            try:
                role = Role.parse(args.role)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            try:
                engine = EngineKind.parse(args.engine)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            from flexlb.http.admin import parse_kv_events

            try:
                kv_events = parse_kv_events(args.kv_events, args.kv_events_replay, ip)
            except ValueError as exc:
                raise UsageError(f"--{str(exc).replace('_', '-')}") from None
            spec = WorkerSpec(ip, port, role, args.grpc_port, args.group, args.max_concurrency, engine, kv_events)
            await store.register_worker(spec, _parse_assignments(args.set))
            print(f"registered {role.value} worker {spec.worker_id} ({engine.value}) in service {store.keys.service!r}")
        elif args.worker_cmd == "update":
            _split_address(args.address)
            changes = _parse_assignments(args.fields)
            if not changes:
                raise UsageError("give at least one field=value")
            try:
                await store.update_status(args.address, changes)
            except WorkerNotFound:
                raise UsageError(f"unknown worker {args.address} in service {store.keys.service!r}") from None
            print(f"updated {args.address}: {orjson.dumps(changes).decode()}")
        elif args.worker_cmd == "remove":
            if not await store.remove_worker(args.address):
                raise UsageError(f"unknown worker {args.address} in service {store.keys.service!r}")
            print(f"removed {args.address}")
        return 0
    finally:
        await redis.aclose()
