"""``setup_proxy``: the proxy's routes on the router's app, its client session's lifecycle, and GET /v1/models."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from flexlb.http.routes import CONTEXT
from flexlb.proxy.auth import UpstreamAuth
from flexlb.proxy.breaker import Breakers
from flexlb.proxy.context import PROXY, ProxyContext, ProxyOptions
from flexlb.proxy.handler import handler_for
from flexlb.proxy.metrics import ProxyMetrics
from flexlb.proxy.parse import Route
from flexlb.proxy.tokenizer import proxy_tokenizer
from flexlb.proxy.upstream import make_client
from flexlb.settings import AuthSettings, FlexlbConfig

MODELS_PATH = "/v1/models"
MODEL_PATH = "/v1/models/{model_id}"  # the pattern as auth classifies it (its canonical form)


PROXY_ROUTES = (*(route.value for route in Route), MODELS_PATH, MODEL_PATH)  # the routes FLEXLB_API_KEYS guards


def setup_proxy(app: web.Application, config: FlexlbConfig, auth: AuthSettings | None = None) -> None:
    """Serve the OpenAI and SGLang routes on ``app`` (a router: its RouterContext must be set); ``auth``: the keys
    sent to engines."""
    router = app[CONTEXT]
    options = ProxyOptions.from_config(config)
    if options.served_model_name:
        # check_model accepts it, on these routes and on /rtp_llm/schedule alike.
        router.model_names = router.model_names | {options.served_model_name}
    app[PROXY] = ProxyContext(
        router=router,
        options=options,
        metrics=ProxyMetrics(router.metrics.registry),
        rng=random.Random(),  # seeded from os.urandom: routers draw independent ids
        created=int(time.time()),
        upstream_auth=UpstreamAuth.from_settings(auth or AuthSettings()),
    )
    app[PROXY].breakers = Breakers(
        config.breaker_failure_threshold, config.breaker_cooldown_ms / 1000, observer=app[PROXY].metrics
    )
    app[PROXY].tokenizer = proxy_tokenizer(config, router, app[PROXY].upstream_auth)
    for route in Route:
        app.router.add_post(route.value, handler_for(route))
    app.router.add_get(MODELS_PATH, list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)  # ids may hold "/": "org/model"
    app.cleanup_ctx.append(_session_lifecycle)


async def _session_lifecycle(app: web.Application) -> AsyncIterator[None]:
    pctx = app[PROXY]
    pctx.session = make_client(pctx.options.connect_timeout_s)
    yield
    await pctx.session.close()
    await pctx.tokenizer.close()


def _card(pctx: ProxyContext) -> dict[str, object]:
    return {"id": pctx.model_name, "object": "model", "created": pctx.created, "owned_by": "flexlb"}


async def list_models(request: web.Request) -> web.Response:
    """The one model this router serves: ``servedModelName``, else the service id."""
    pctx = request.app[PROXY]
    pctx.metrics.count_request(MODELS_PATH, 200)
    return web.Response(body=orjson.dumps({"object": "list", "data": [_card(pctx)]}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: the model's card when ``id`` is the listed name, else OpenAI's 404 model_not_found."""
    pctx = request.app[PROXY]
    model_id = request.match_info["model_id"]
    if model_id == pctx.model_name:
        pctx.metrics.count_request(MODEL_PATH, 200)
        return web.Response(body=orjson.dumps(_card(pctx)), content_type="application/json")
    pctx.metrics.count_request(MODEL_PATH, 404)
    message = f"The model {model_id!r} does not exist: this router serves {pctx.model_name!r} (GET /v1/models)"
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    return web.Response(body=orjson.dumps({"error": error}), status=404, content_type="application/json")
