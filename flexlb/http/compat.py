"""Endpoints other balancers' clients call, mapped onto flexlb's own.

- The original FlexLB's ``POST /rtp_llm/notify_master`` (``{"reqIp", "roleId"}``: "re-read who the master is"):
  flexlb reads the master lock from Redis on every ask, so it answers with the current holder and epoch, as
  ``/rtp_llm/master/info`` does; a schedule-API route.
- The original's ``POST /rtp_llm/update_log_level`` (``{"log_level": "debug"}``): the log level of every router
  process of the service (over Redis pub/sub, flexlb.state.log_level), answered with how many applied it; an admin
  route.
- SGLang's router (smg) and vllm-router's ``POST /add_worker?url=``, ``POST /remove_worker?url=`` and
  ``GET /list_workers``: aliases of the admin API (``/rtp_llm/workers``), admin routes with its token, its checks;
  ``/add_worker`` also takes flexlb's ``&engine=vllm``, ``&kv_events=tcp://host:port`` and ``&kv_events_replay=``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from flexlb.cli_options import FlagError, worker_address
from flexlb.domain import Role
from flexlb.http.admin import identity_refusal, parse_worker_spec
from flexlb.http.auth import Api, serve_as
from flexlb.http.body import request_body
from flexlb.http.routes import CONTEXT, bad_request, json_response, lock_info, worker_json
from flexlb.http.wire import BadRequest, parse_json_object
from flexlb.logs import set_level
from flexlb.state.log_level import LogLevelFollower, broadcast_log_level

log = logging.getLogger("flexlb.http")

# smg's worker_type values -> flexlb roles (regular: a worker that does both, PDFUSION)
_WORKER_TYPES = {"regular": Role.PDFUSION, "prefill": Role.PREFILL, "decode": Role.DECODE}


async def _optional_object(request: web.Request) -> dict[str, Any]:
    """The JSON object of the body; an empty body is an empty object (these clients often send none)."""
    body = await request_body(request)
    return parse_json_object(body) if body.strip() else {}


async def notify_master(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        data = await _optional_object(request)
        for name in ("reqIp", "roleId"):
            if data.get(name) is not None and not isinstance(data[name], str | int):
                raise BadRequest(f"{name}: expected a string, got {type(data[name]).__name__}")
    except BadRequest as exc:
        return bad_request(exc, ctx)
    body: dict[str, Any] = {"success": True, "code": 200, "real_master_host": ctx.master_host}
    return json_response(body | await lock_info(ctx.store))


async def update_log_level(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        data = await _optional_object(request)
        level = data.get("log_level")
        if not isinstance(level, str):
            raise BadRequest(f'log_level: expected a string such as "debug", got {type(level).__name__}')
        try:
            new = set_level(level)
        except ValueError as exc:
            raise BadRequest(f"log_level: {exc}") from None
    except BadRequest as exc:
        return bad_request(exc, ctx)
    log.warning("log level set to %s by POST /rtp_llm/update_log_level from %s", new, request.remote)
    body: dict[str, Any] = {"success": True, "code": 200, "log_level": new}
    me = {"host": socket.gethostname(), "pid": os.getpid(), "level": new}
    try:  # this process has it already; the others get it over Redis
        sent = await broadcast_log_level(ctx.store.redis, ctx.store.keys, new)
    except (RedisError, OSError) as exc:  # Redis away: only this process changed
        log.warning("log level %s: not sent to the other router processes (%r)", new, exc)
        return json_response(body | {"processes": 1, "applied": [me], "error_message": repr(exc)})
    applied = {(a.get("host"), a.get("pid")): a for a in [me, *sent.applied]}  # this one answers itself too
    return json_response(body | {"processes": len(applied), "reached": sent.reached, "applied": list(applied.values())})


async def _follow_log_level(app: web.Application) -> AsyncIterator[None]:
    """Every router process applies the levels other processes' /rtp_llm/update_log_level send."""
    store = app[CONTEXT].store
    follower = LogLevelFollower(store.redis, store.keys, set_level)
    follower.start()
    yield
    await follower.stop()


def _url_spec(request: web.Request) -> dict[str, Any]:
    """``?url=http://host:port[&worker_type=prefill|decode|regular][&role=...]`` as an admin API registration."""
    url = request.query.get("url")
    if not url:
        raise BadRequest("url: required, e.g. ?url=http://10.0.0.1:8000")
    try:
        host, _, port = worker_address(url, "url").rpartition(":")
    except FlagError as exc:
        raise BadRequest(str(exc)) from None
    kind = request.query.get("role") or request.query.get("worker_type") or "regular"
    role = _WORKER_TYPES.get(kind.lower())
    spec = {"ip": host.strip("[]"), "http_port": int(port), "role": role.value if role else kind}
    # flexlb's own: how the master polls it, where it publishes KV events (as POST /rtp_llm/workers takes them)
    extra = ("engine", "kv_events", "kv_events_replay")
    return spec | {name: request.query[name] for name in extra if name in request.query}


async def add_worker(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        spec = parse_worker_spec(_url_spec(request))
    except BadRequest as exc:
        return bad_request(exc, ctx)
    refusal = await identity_refusal(spec)
    if refusal is not None:
        return bad_request(BadRequest(refusal, status=409), ctx)
    await ctx.store.register_worker(spec, {})
    return json_response({"success": True, "worker_id": spec.worker_id, "url": f"http://{spec.worker_id}"})


async def remove_worker(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        data = _url_spec(request)
    except BadRequest as exc:
        return bad_request(exc, ctx)
    worker_id = f"{data['ip']}:{data['http_port']}"
    if not await ctx.store.remove_worker(worker_id):
        return bad_request(BadRequest(f"unknown worker {worker_id!r}", status=404), ctx)
    return json_response({"success": True, "worker_id": worker_id})


async def list_workers(request: web.Request) -> web.Response:
    views = await request.app[CONTEXT].store.list_workers()
    return json_response({"urls": [f"http://{v.worker_id}" for v in views], "workers": [worker_json(v) for v in views]})


ADMIN_ALIASES = ("/add_worker", "/remove_worker", "/list_workers", "/rtp_llm/update_log_level")


def setup_compat_routes(app: web.Application) -> None:
    app.router.add_post("/rtp_llm/notify_master", notify_master)
    app.router.add_post("/rtp_llm/update_log_level", update_log_level)
    app.cleanup_ctx.append(_follow_log_level)
    app.router.add_post("/add_worker", add_worker)
    app.router.add_post("/remove_worker", remove_worker)
    app.router.add_get("/list_workers", list_workers)
    serve_as(app, Api.SCHEDULE, ["/rtp_llm/notify_master"])
    serve_as(app, Api.ADMIN, ADMIN_ALIASES)  # the admin token, as /rtp_llm/workers (also the default: said plainly)
