"""The environment as a whole: the variables outside FLEXLB_CONFIG (REDIS_URL, the sync and timeout variables),
``Settings`` and ``load_settings``, the one function that maps an environment to Settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from flexlb.settings.auth import AuthSettings, parse_auth_settings
from flexlb.settings.common import ConfigError, EnvVar, _blank, _check_range, _from_text
from flexlb.settings.flexlb_config import FlexlbConfig, parse_flexlb_config
from flexlb.settings.model_service import ServiceConfig, parse_service_config
from flexlb.state.redis_url import RedisUrlError, parse_redis_url

ENV_VARS: Final[tuple[EnvVar, ...]] = (
    EnvVar("FLEXLB_CONFIG", "{}", "The balancer's options: a camelCase JSON object (fields below)."),
    EnvVar("WHALE_MASTER_CONFIG", None, "The original's older name for FLEXLB_CONFIG, read when that is unset."),
    EnvVar("MODEL_SERVICE_CONFIG", None, "The model service and its static workers (see below). Unset: no workers."),
    EnvVar("FLEXLB_SERVICE_ID", "default", "Overrides MODEL_SERVICE_CONFIG's service_id."),
    EnvVar(
        "REDIS_URL",
        None,
        "The shared Redis: redis://, rediss://, unix://; a cluster redis+cluster://host:port[,host:port...]; Sentinel"
        " redis+sentinel://host:port[,...]/<master name>. Unset: start redis-server.",
    ),
    EnvVar("SYNC_STATUS_INTERVAL", 20, "Worker status poll interval, in ms."),
    EnvVar("SYNC_REQUEST_TIMEOUT_MS", 100, "Timeout of one worker status call, in ms."),
    EnvVar("TASK_TIMEOUT_US", 3_000_000, "A task not seen in worker status for this long is dropped, in us."),
    EnvVar("WORKER_TIMEOUT_US", 3_000_000, "A worker not updated for this long is dropped, in us."),
)
_ENV_VAR_BY_NAME: Final = {v.name: v for v in ENV_VARS}


def _int_var(environ: Mapping[str, str], name: str) -> int:
    var = _ENV_VAR_BY_NAME[name]
    assert isinstance(var.default, int)
    text = environ.get(name)
    if _blank(text):
        return var.default
    assert text is not None
    where = f"{name} (environment)"
    value = _from_text(text, int, where)
    assert isinstance(value, int)
    _check_range(value, where, var.low, None, False)
    return value


def _redis_url(environ: Mapping[str, str]) -> str | None:
    text = environ.get("REDIS_URL")
    if _blank(text):
        return None
    assert text is not None
    url = text.strip()
    try:
        parse_redis_url(url)  # the errors echo only the scheme: the rest of a URL may hold a password
    except RedisUrlError as exc:
        raise ConfigError(f"REDIS_URL (environment): {exc}") from None
    return url


@dataclass(frozen=True, slots=True)
class Settings:
    flexlb: FlexlbConfig
    service: ServiceConfig
    redis_url: str | None  # None: the CLI starts an embedded redis-server
    sync_status_interval_ms: int
    sync_request_timeout_ms: int
    task_timeout_ms: int
    worker_timeout_ms: int
    auth: AuthSettings = AuthSettings()  # noqa: RUF009 (frozen: one shared default is safe)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse ``environ`` (default ``os.environ``) into Settings; raise ConfigError on the first bad value."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return Settings(
        flexlb=parse_flexlb_config(env),
        service=parse_service_config(env),
        redis_url=_redis_url(env),
        sync_status_interval_ms=_int_var(env, "SYNC_STATUS_INTERVAL"),
        sync_request_timeout_ms=_int_var(env, "SYNC_REQUEST_TIMEOUT_MS"),
        # Rounded up so a sub-millisecond value never becomes 0 (no timeout at all).
        task_timeout_ms=-(-_int_var(env, "TASK_TIMEOUT_US") // 1000),
        worker_timeout_ms=-(-_int_var(env, "WORKER_TIMEOUT_US") // 1000),
        auth=parse_auth_settings(env),
    )
