"""Configuration: the environment parsed into frozen dataclasses, compatible with the original FlexLB's variables.

``load_settings()`` reads FLEXLB_CONFIG (camelCase JSON; every field can be overridden by an UPPER_SNAKE variable),
MODEL_SERVICE_CONFIG (the static workers), REDIS_URL and the sync / timeout variables. A bad value raises one
``ConfigError`` naming the field and where it came from; options of the original that flexlb ignores only log a
warning, so an existing deployment's environment keeps working.

One module per concern, every public name re-exported here (import them from ``flexlb.settings``):

- ``flexlb_config``: FLEXLB_CONFIG. Each field is declared once, on ``FlexlbConfig``; ``CONFIG_FIELDS``, the parser
  and ``render_config_table()`` (pasted into docs/configuration.md, checked by a test) all derive from it.
- ``strategies``: the strategy names, and the original's older ones mapped to them.
- ``model_service``: MODEL_SERVICE_CONFIG and FLEXLB_SERVICE_ID (the service and its static workers).
- ``auth``: the API keys and tokens (docs/security.md).
- ``environment``: the other variables, ``Settings`` and ``load_settings``.
- ``common``: ``ConfigError`` and the coercion and checks of one value, shared by the others.
- ``docs``: ``render_config_table()``; run ``python -m flexlb.settings`` to print the table.

Every part logs as ``flexlb.settings``.
"""

from flexlb.settings.auth import AUTH_VARS, AuthSettings, parse_auth_settings
from flexlb.settings.common import ConfigError, EnvVar, Scalar
from flexlb.settings.docs import render_config_table
from flexlb.settings.environment import ENV_VARS, Settings, load_settings
from flexlb.settings.flexlb_config import (
    CONFIG_FIELDS,
    IGNORED_KEYS,
    ConfigField,
    FlexlbConfig,
    parse_flexlb_config,
)
from flexlb.settings.model_service import SERVICE_ID_PATTERN, ServiceConfig, StaticWorker, parse_service_config
from flexlb.settings.strategies import LEGACY_STRATEGIES, STRATEGIES, parse_strategy

__all__ = [
    "AUTH_VARS",
    "CONFIG_FIELDS",
    "ENV_VARS",
    "IGNORED_KEYS",
    "LEGACY_STRATEGIES",
    "SERVICE_ID_PATTERN",
    "STRATEGIES",
    "AuthSettings",
    "ConfigError",
    "ConfigField",
    "EnvVar",
    "FlexlbConfig",
    "Scalar",
    "ServiceConfig",
    "Settings",
    "StaticWorker",
    "load_settings",
    "parse_auth_settings",
    "parse_flexlb_config",
    "parse_service_config",
    "parse_strategy",
    "render_config_table",
]
