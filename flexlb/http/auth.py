"""Who may call what: the router's keys and tokens, checked once per request by one middleware (and by the gRPC
schedule API through ``Keyring.check``). docs/security.md describes the model.

Every route belongs to one API (``Api``): the OpenAI proxy (``FLEXLB_API_KEYS``), the schedule API
(``FLEXLB_SCHEDULE_TOKENS``), the admin API (``FLEXLB_ADMIN_TOKEN``) or the open probes (``/health``,
``/metrics``). A route is classified by the pattern it was registered with, never by the raw path, and a route not
listed is an admin route: a new endpoint is closed until someone decides otherwise. An API without keys is open.

A presented key is compared with every key of every API, each by ``hmac.compare_digest`` of SHA-256 digests (fixed
length, no early exit), so the time taken says nothing about which key, or how much of one, matched. A request
carries the matched key's fingerprint (``client_of``), never the key: logs, reservation owners and metrics use that.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from flexlb.domain import ErrorCode
from flexlb.http.wire import error_body
from flexlb.settings import AuthSettings

log = logging.getLogger("flexlb.auth")

ANONYMOUS = "anonymous"  # the client of an API without tokens: all its callers are one client


class Api(enum.StrEnum):
    PROXY = "proxy"
    SCHEDULE = "schedule"
    ADMIN = "admin"
    OPEN = "open"


# What each API's keys are called in messages: the variable that sets them.
KEY_VARIABLE = {Api.PROXY: "FLEXLB_API_KEYS", Api.SCHEDULE: "FLEXLB_SCHEDULE_TOKENS", Api.ADMIN: "FLEXLB_ADMIN_TOKEN"}

# Routes (as registered) of the schedule API and the probes; the proxy's are added by setup_proxy (``serve_as``).
SCHEDULE_ROUTES = frozenset({"/rtp_llm/schedule", "/rtp_llm/release", "/rtp_llm/master/info"})
OPEN_ROUTES = frozenset({"/health", "/metrics"})

CLIENT = web.AppKey("flexlb_auth_keyring", "Keyring")
_API_ROUTES = web.AppKey("flexlb_auth_routes", dict)
CLIENT_KEY = "flexlb.auth.client"  # request key: the fingerprint of the key the request came with (or ANONYMOUS)


def fingerprint(key: str) -> str:
    """A short, stable name of a key for logs and bookkeeping (not reversible to the key)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header (the scheme in any case), else None."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: HTTP 401 (no or an unknown key) or 403 (a key of another API)."""

    status: int
    code: ErrorCode
    message: str
    openai_code: str | None  # the proxy's ``error.code``: OpenAI's "invalid_api_key" for a wrong key, null if none


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    api: Api
    client: str


class Keyring:
    """Every API's keys, as SHA-256 digests."""

    def __init__(self, auth: AuthSettings) -> None:
        lists = {Api.PROXY: auth.api_keys, Api.SCHEDULE: auth.schedule_tokens, Api.ADMIN: auth.admin_tokens}
        self._entries = tuple(
            _Entry(hashlib.sha256(key.encode()).digest(), api, fingerprint(key))
            for api, keys in lists.items()
            for key in keys
        )
        self._closed = frozenset(api for api, keys in lists.items() if keys)

    def requires_key(self, api: Api) -> bool:
        return api in self._closed

    def _match(self, presented: str) -> _Entry | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for entry in self._entries:  # every entry, whatever matched before: the time does not depend on which
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def check(self, api: Api, authorization: str | None) -> str | Refusal:
        """The client (a key's fingerprint, or ANONYMOUS for an open API) or why the call is refused."""
        if not self.requires_key(api):
            return ANONYMOUS
        variable = KEY_VARIABLE[api]
        presented = bearer(authorization)
        if presented is None:
            what = "no Authorization header" if authorization is None else "an Authorization header that is not Bearer"
            return Refusal(
                401,
                ErrorCode.UNAUTHENTICATED,
                f"missing credentials: the {api.value} API requires 'Authorization: Bearer <key>' (one of"
                f" {variable}); the request has {what}",
                None,
            )
        entry = self._match(presented)
        if entry is None:
            return Refusal(
                401,
                ErrorCode.UNAUTHENTICATED,
                f"invalid credentials: the bearer key is not one of {variable} (the {api.value} API's keys)",
                "invalid_api_key",
            )
        if entry.api is not api:
            return Refusal(
                403,
                ErrorCode.PERMISSION_DENIED,
                f"permission denied: the bearer key is one of {KEY_VARIABLE[entry.api]} (the {entry.api.value} API's),"
                f" not of {variable}; the {api.value} API needs its own",
                "invalid_api_key",
            )
        return entry.client


def client_of(request: web.Request) -> str:
    """The client a request came from: its key's fingerprint, or ANONYMOUS on an open API."""
    return request.get(CLIENT_KEY, ANONYMOUS)


def serve_as(app: web.Application, api: Api, routes: Iterable[str]) -> None:
    """Declare the API of routes added outside this module's lists (the proxy's)."""
    app[_API_ROUTES].update(dict.fromkeys(routes, api))


def api_of(app: web.Application, request: web.Request) -> Api | None:
    """The API of the route ``request`` matched; None when it matched none (the server answers 404 / 405)."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or request.match_info.http_exception is not None:
        return None
    pattern = resource.canonical
    return app[_API_ROUTES].get(pattern) or (
        Api.SCHEDULE if pattern in SCHEDULE_ROUTES else Api.OPEN if pattern in OPEN_ROUTES else Api.ADMIN
    )


def log_refusal(method: str, path: str, peer: str | None, refusal: Refusal) -> None:
    # The path and the peer, never the key: a log of refusals is a log of probes.
    log.info("%s %s from %s: %d %s", method, path, peer, refusal.status, refusal.message.partition(":")[0])


def refusal_answer(api: Api, refusal: Refusal, master_host: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The refusal's JSON body in the API's own error shape (OpenAI's for the proxy, the schedule API's for the
    others) and its headers."""
    if api is Api.PROXY:
        kind = "invalid_request_error"  # what OpenAI answers for a missing or wrong key
        error = {"message": refusal.message, "type": kind, "param": None, "code": refusal.openai_code}
        body: dict[str, Any] = {"error": error}
    else:
        body = error_body(refusal.code, refusal.message, master_host=master_host)
    headers = {"WWW-Authenticate": 'Bearer realm="flexlb"'} if refusal.status == 401 else {}
    return body, headers


def refusal_response(api: Api, refusal: Refusal, master_host: str | None = None) -> web.Response:
    body, headers = refusal_answer(api, refusal, master_host)
    return web.Response(
        body=orjson.dumps(body), status=refusal.status, content_type="application/json", headers=headers or None
    )


def setup_auth(app: web.Application, auth: AuthSettings, master_host: str | None = None) -> None:
    """Check every request of ``app`` against ``auth``'s keys (the middleware must be in ``app``'s list:
    ``auth_middleware``)."""
    app[CLIENT] = Keyring(auth)
    app[_API_ROUTES] = {}

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = api_of(app, request)
        if api is None:
            return await handler(request)
        outcome = app[CLIENT].check(api, request.headers.get("Authorization"))
        if isinstance(outcome, Refusal):
            log_refusal(request.method, request.path, request.remote, outcome)
            return refusal_response(api, outcome, master_host)
        request[CLIENT_KEY] = outcome
        return await handler(request)

    app.middlewares.append(auth_middleware)


def is_loopback(host: str) -> bool:
    if host.strip("[]") in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_open(auth: AuthSettings, listeners: Iterable[tuple[str, str]]) -> list[str]:
    """Log a loud warning for each API served without keys on a non-loopback address; returns the lines logged.

    ``listeners``: (what, host) pairs, e.g. ("HTTP", "0.0.0.0")."""
    lines = []
    for what, host in listeners:
        if is_loopback(host):
            continue
        if not auth.admin_tokens and what == "HTTP":
            lines.append(
                f"SECURITY WARNING: the admin API (register, update and remove workers, snapshots) is OPEN on {host}:"
                " anyone who reaches this address can take workers out, steer every request or receive users'"
                " prompts. Set FLEXLB_ADMIN_TOKEN, or listen on 127.0.0.1 (docs/security.md)."
            )
        open_apis = [
            name
            for name, keys in (("schedule API", auth.schedule_tokens), ("OpenAI proxy", auth.api_keys))
            if not keys and (what == "HTTP" or name == "schedule API")
        ]
        if open_apis:
            variables = " / ".join(
                "FLEXLB_SCHEDULE_TOKENS" if "schedule" in n else "FLEXLB_API_KEYS" for n in open_apis
            )
            lines.append(
                f"SECURITY WARNING: the {' and the '.join(open_apis)} on {what} {host} take calls without a key;"
                f" set {variables} to require one (docs/security.md)."
            )
    for line in lines:
        log.warning("%s", line)
    return lines
