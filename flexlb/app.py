"""Wiring of the processes: create_app (a router: Redis client, store, scheduler, HTTP routes, and the master
election when it contends) and create_master_app (``flexlb master``: the election and a health endpoint). No logic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from flexlb.admission import AdmissionControl, AdmissionOptions
from flexlb.discovery import StaticWorkers
from flexlb.domain import ROLE_ORDER, Role
from flexlb.grpc_api import GrpcScheduleApi
from flexlb.http.admin import setup_admin_routes
from flexlb.http.auth import CLIENT, Api, serve_as, setup_auth
from flexlb.http.compat import setup_compat_routes
from flexlb.http.drain import InFlightRequests
from flexlb.http.fast_path import FastPath
from flexlb.http.middleware import RequestReader, json_errors
from flexlb.http.routes import CONTEXT, MASTER, setup_master_routes, setup_routes
from flexlb.http.server import FRONT, WATCH, ConnectionWatch, ReadTimeouts
from flexlb.http.wire import schedule_body_limit
from flexlb.master.election import current_master
from flexlb.master.health import HealthOptions, HttpGetter
from flexlb.master.router_health import RouterHealthChecks
from flexlb.master.service import MasterService, default_holder
from flexlb.metrics import (
    MasterMetrics,
    SchedulerMetrics,
    exposition_registry,
    register_fleet_collector,
    register_process_collectors,
)
from flexlb.proxy import setup_proxy
from flexlb.proxy.routes import PROXY_ROUTES
from flexlb.queueing import QueueMetrics, QueueOptions, RequestQueue
from flexlb.reservation_owners import ReservationOwners
from flexlb.routing import ChoiceMemory, StrategyName, StrategyParams, TtftModel
from flexlb.schedule_api import RouterContext
from flexlb.scheduler import Scheduler, SchedulerOptions
from flexlb.settings import FlexlbConfig, Settings
from flexlb.state.connection import use_hiredis_packing
from flexlb.state.errors import REDIS_UNAVAILABLE
from flexlb.state.events import FleetEvents
from flexlb.state.pipelined import PipelinedRedis
from flexlb.state.redis_url import parse_redis_url
from flexlb.state.store import FleetStore

log = logging.getLogger("flexlb.app")

MAX_BODY_BYTES = 4 * 1024 * 1024  # a proxied prompt of ~1M tokens; schedule bodies have their own, smaller limit


def make_redis(url: str, timeout_ms: int) -> Redis:
    """A client that fails fast when Redis is away (the scheduler then degrades) and retries a stale connection once.

    ``url`` names one Redis, a cluster (``RedisCluster``: it follows MOVED / ASK and finds a slot's new owner after
    a failover) or a Sentinel set (the primary is asked of the sentinels at every connect); see
    flexlb/state/redis_url.py."""
    timeout = timeout_ms / 1000
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }
    target = parse_redis_url(url)
    auth = {"username": target.username, "password": target.password}
    if target.tls:
        options["ssl"] = True
    if target.kind == "cluster":
        # full coverage is the cluster's business: a router needs its service's slot only
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        cluster = RedisCluster(startup_nodes=nodes, require_full_coverage=False, **auth, **options)
        return cast(Redis, cluster)  # it answers every command the store and the election send
    if target.kind == "sentinel":
        sentinel_options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if target.sentinel_password:
            sentinel_options["password"] = target.sentinel_password
        sentinel = Sentinel(target.nodes, sentinel_kwargs=sentinel_options, **options)
        assert target.master_name is not None
        return sentinel.master_for(target.master_name, db=target.db, **auth, **options)
    client = Redis.from_url(url, **options)
    use_hiredis_packing(client.connection_pool)
    return client


def make_pipelined(url: str | None, timeout_ms: int) -> PipelinedRedis | None:
    """The decision path's pipelined client for the URLs it speaks; None: scripts go through redis-py."""
    if url is None or not PipelinedRedis.supports(url):
        return None
    return PipelinedRedis(url, timeout_s=timeout_ms / 1000)


def read_timeouts(config: FlexlbConfig) -> ReadTimeouts:
    """The HTTP server's read timeouts (``flexlb serve`` passes them to the server, flexlb/http/server.py)."""
    return ReadTimeouts(
        header_s=config.http_header_timeout_ms / 1000,
        body_s=config.http_body_timeout_ms / 1000,
        idle_s=config.http_idle_timeout_ms / 1000,
    )


def scheduler_options(config: FlexlbConfig, roles: tuple[Role, ...]) -> SchedulerOptions:
    return SchedulerOptions(
        strategies={role: StrategyName(config.strategy_for(role)) for role in ROLE_ORDER},
        params=StrategyParams(
            ttft=TtftModel(
                default_prefill_tokens_per_ms=config.default_prefill_tokens_per_ms,
                overhead_ms=config.prefill_overhead_ms,
            ),
            weighted_cache_decay=config.weighted_cache_decay_factor,
            tie_ratio=config.ttft_tie_ratio,
            best_fraction=config.ttft_best_fraction,
        ),
        roles=roles,
        reservation_ttl_ms=config.reservation_ttl_ms,
        retries=config.schedule_retries,
        max_staleness_ms=config.degraded_max_staleness_ms,
        status_max_age_ms=config.worker_status_max_age_ms,
        inflight_ttl_ms=config.inflight_prefix_ttl_ms,
        approx_ttl_ms=config.approx_prefix_ttl_ms,
        approx_max_blocks=config.approx_prefix_max_blocks,
        block_mirror=config.block_mirror,
        view_block_ms=max(1, min(500, config.redis_timeout_ms // 2)),
    )


def _redis_for(settings: Settings, redis: Redis | None) -> Redis:
    if redis is not None:
        return redis
    if settings.redis_url is None:
        raise ValueError("REDIS_URL is not set: pass redis_url (the CLI starts an embedded redis-server)")
    return make_redis(settings.redis_url, settings.flexlb.redis_timeout_ms)


def create_app(
    settings: Settings,
    *,
    redis: Redis | None = None,
    registry: CollectorRegistry | None = None,
    master_host: str | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """One router. ``redis`` and ``registry`` may be passed in (tests); otherwise built from settings."""
    config = settings.flexlb
    # an injected client (tests) is used for everything; else the decision path's scripts share one pipelined
    # connection (flexlb.state.pipelined) and everything else goes through redis-py
    pipelined = None if redis is not None else make_pipelined(settings.redis_url, config.redis_timeout_ms)
    redis = _redis_for(settings, redis)
    if registry is None:  # this process's own (tests pass theirs)
        registry = CollectorRegistry()
        register_process_collectors(registry)
    metrics = SchedulerMetrics(registry)
    store = FleetStore(redis, settings.service.service_id, pipelined)
    scheduler = Scheduler(
        store,
        scheduler_options(config, settings.service.roles),
        ChoiceMemory(rng=rng or random.Random()),
        metrics,
    )
    events = FleetEvents(redis, store.keys)
    events.follow(scheduler.view_sync)
    queue = RequestQueue(
        scheduler,
        events,
        QueueOptions(
            enabled=config.enable_queueing,
            max_size=config.max_queue_size,
            max_retries=config.max_retry_count,
            admission_interval_s=config.resource_check_interval_ms / 1000,
        ),
        QueueMetrics(registry),
        AdmissionControl(
            AdmissionOptions(
                min_permits=config.admission_min_permits,
                max_permits=config.admission_max_permits,
                decode_full_speed_percent=config.decode_full_speed_threshold,
                decode_stop_percent=config.decode_stop_threshold,
                max_prefill_queue=config.max_prefill_queue_size,
            )
        ),
    )
    master = None
    health = None
    if config.contend_for_master:
        master = MasterService(redis, settings, MasterMetrics(registry), holder=default_holder("router"))
    else:  # while no master runs, this router checks the workers' health (flexlb/master/router_health.py)
        health = _router_health_checks(store, scheduler, config)
    in_flight = InFlightRequests()
    reader = RequestReader(
        config.http_body_timeout_ms / 1000,
        MAX_BODY_BYTES,
        {"/rtp_llm/schedule": (schedule_body_limit(config.max_block_cache_keys), "maxBlockCacheKeys")},
    )
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[in_flight.middleware, reader.middleware, json_errors],
        handler_args={"auto_decompress": False},  # RequestReader decodes bodies, within its limits
    )
    app[WATCH] = ConnectionWatch(config.http_header_timeout_ms / 1000)
    app[CONTEXT] = RouterContext(
        scheduler=scheduler,
        store=store,
        metrics=metrics,
        service_id=settings.service.service_id,
        master_host=master_host or f"127.0.0.1:{config.http_port}",
        master=master,
        queue=queue,
        metrics_registry=exposition_registry(registry),
        max_block_cache_keys=config.max_block_cache_keys,
        owners=_reservation_owners(settings),
    )
    register_fleet_collector(app[CONTEXT].metrics_registry or registry, scheduler.view.all)  # healthy workers
    setup_auth(app, settings.auth, app[CONTEXT].master_host)
    if config.http_fast_path:
        fast = FastPath(
            app[CONTEXT],
            app[CLIENT],
            in_flight,
            app[WATCH],
            read_timeouts(config),
            {"/rtp_llm/schedule": schedule_body_limit(config.max_block_cache_keys), "/rtp_llm/release": MAX_BODY_BYTES},
        )
        app[FRONT] = fast
        app.on_shutdown.append(fast.shutdown)  # before the drain below: idle connections close first
    grpc_api = GrpcScheduleApi.from_config(config) if config.enable_grpc_prefill_master else None
    if grpc_api is not None:  # claims its port first: one in use fails start-up before anything has started
        app.cleanup_ctx.append(grpc_api.bind)
        app.on_shutdown.append(grpc_api.shutdown)  # SIGTERM: takes no new calls, as the HTTP listener
    setup_routes(app)
    setup_admin_routes(app)
    setup_compat_routes(app)
    setup_proxy(app, config, settings.auth)
    serve_as(app, Api.PROXY, PROXY_ROUTES)
    app.on_shutdown.append(_stop_taking_work(queue, master, in_flight, config.shutdown_timeout_ms))
    app.cleanup_ctx.append(_router_lifecycle(settings, redis, pipelined, store, master, events, queue, health))
    if grpc_api is not None:  # serves once the router is up, stops before it goes
        app.cleanup_ctx.append(grpc_api.serve)
    return app


def create_master_app(
    settings: Settings,
    *,
    redis: Redis | None = None,
    registry: CollectorRegistry | None = None,
    holder: str | None = None,
) -> web.Application:
    """``flexlb master``: contends for the master lock and polls the workers while it holds it; serves /health,
    /metrics and /rtp_llm/master/info. It also keeps the static workers registered."""
    redis = _redis_for(settings, redis)
    if registry is None:
        registry = CollectorRegistry()
        register_process_collectors(registry)
    store = FleetStore(redis, settings.service.service_id)
    master = MasterService(redis, settings, MasterMetrics(registry), holder=holder or default_holder("master"))
    app = web.Application(middlewares=[json_errors])
    app[MASTER] = master
    setup_auth(app, settings.auth)
    setup_master_routes(app, exposition_registry(registry))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        static = StaticWorkers(settings.service.endpoints)
        started = await _start_with_redis(store, static)
        master.start()
        background = asyncio.create_task(_maintain(settings, store, static, None, master, started=started))
        yield
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
        await master.stop()
        await redis.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app


def _reservation_owners(settings: Settings) -> ReservationOwners | None:
    """Per-client bookkeeping of the schedule API: needed for client tokens (a client releases only its own) or a
    cap (maxReservationsPerToken); None otherwise (no cost)."""
    tokens = bool(settings.auth.schedule_tokens)
    cap = settings.flexlb.max_reservations_per_token
    return ReservationOwners(cap, check_release=tokens) if tokens or cap else None


async def _start_with_redis(store: FleetStore, static: StaticWorkers, *, retry: bool = False) -> bool:
    """Load the scripts and register the static workers; False while Redis does not answer."""
    try:
        await store.scripts.preload()
        await static.register(store, [v.worker_id for v in await store.list_workers()])
    except REDIS_UNAVAILABLE as exc:
        if not retry:  # the process still starts: the maintenance loop retries this until Redis answers
            log.error("Redis unreachable at start-up (%s); /health says starting until it answers", exc)
        return False
    if retry:
        log.warning("Redis answers: start-up finished")
    return True


def _stop_taking_work(
    queue: RequestQueue, master: MasterService | None, in_flight: InFlightRequests, timeout_ms: int
) -> Callable[[web.Application], Awaitable[None]]:
    async def on_shutdown(app: web.Application) -> None:
        """SIGTERM, once the listening socket is closed: answer the queued requests now, hand the master lock over
        (another process polls the workers meanwhile), let the requests in flight run up to shutdownTimeoutMs and
        cancel the rest (their finally blocks release their reservations)."""
        log.info("shutting down: %d requests in flight have %.1fs to finish", len(in_flight), timeout_ms / 1000)
        await queue.stop()
        if master is not None:
            await master.stop()
        await in_flight.drain(timeout_ms / 1000)

    return on_shutdown


def _router_health_checks(store: FleetStore, scheduler: Scheduler, config: FlexlbConfig) -> RouterHealthChecks:
    async def master_held() -> bool:
        holder, _ = await current_master(store.redis, store.keys)
        return holder is not None

    options = HealthOptions.from_config(config)
    return RouterHealthChecks(store, scheduler.view.all, master_held, HttpGetter(options.timeout_s), options)


def _router_lifecycle(
    settings: Settings,
    redis: Redis,
    pipelined: PipelinedRedis | None,
    store: FleetStore,
    master: MasterService | None,
    events: FleetEvents,
    queue: RequestQueue,
    health: RouterHealthChecks | None = None,
):
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        ctx = app[CONTEXT]
        static = StaticWorkers(settings.service.endpoints)
        ctx.ready = await _start_with_redis(store, static)
        if master is not None:
            master.start()
        ctx.scheduler.view_sync.start()
        queue.start()

        def on_started() -> None:
            ctx.ready = True

        background = asyncio.create_task(
            _maintain(settings, store, static, ctx.scheduler, master, started=ctx.ready, on_started=on_started)
        )
        checks = asyncio.create_task(health.run(), name="health checks") if health is not None else None
        yield
        if checks is not None:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
        # The server has drained or cancelled every handler by now (shutdownTimeoutMs); queue and master stopped at
        # shutdown (both idempotent). Redis closes last: releases of cancelled handlers may still be writing.
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
        await queue.stop()
        await events.stop()
        await ctx.scheduler.view_sync.stop()
        if master is not None:
            await master.stop()
        await ctx.scheduler.finish_releases()
        if pipelined is not None:
            await pipelined.aclose()
        await redis.aclose()

    return lifecycle


async def _sweeps(store: FleetStore, master: MasterService | None) -> bool:
    """Whether this process sweeps overdue reservations now: the master does; a router only while there is none."""
    if master is not None and master.election.is_master:
        return True
    holder, _ = await current_master(store.redis, store.keys)
    return holder is None


async def _maintain(
    settings: Settings,
    store: FleetStore,
    static: StaticWorkers,
    scheduler: Scheduler | None,
    master: MasterService | None,
    *,
    started: bool,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Background duties of every process: finish the start-up once Redis answers (``started`` false), keep the
    static workers registered (their DNS names re-resolved: flexlb.discovery), write the releases Redis missed while
    it was down (routers), and, in the master (or in every process while no one holds the master lock), expire
    reservations of workers no request reserves (reservations expire the others): the fleet's load on idle workers
    comes back after a router crashed."""
    interval = min(max(settings.flexlb.reservation_ttl_ms / 4000, 0.1), 1.0)
    while True:
        await asyncio.sleep(interval)
        if not started:
            started = await _start_with_redis(store, static, retry=True)
            if not started:
                continue
            if on_started is not None:
                on_started()
        try:
            if scheduler is not None:
                await scheduler.write_unwritten_releases()
            # a router knows the fleet from its view; only `flexlb master` reads every worker (once per interval)
            views = list(scheduler.view.all()) if scheduler is not None else await store.list_workers()
            await static.register(store, [v.worker_id for v in views])
            if await _sweeps(store, master):
                await store.sweep([v.worker_id for v in views if v.pending_count])
        except REDIS_UNAVAILABLE:
            pass  # the scheduler reports the outage; these duties resume with Redis
        except Exception:
            log.exception("maintenance failed (static workers, overdue reservations)")
