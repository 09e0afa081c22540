"""Authentication: the keys and tokens of every API (docs/security.md), from environment variables or their
``_FILE`` variants."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from flexlb.settings.common import ConfigError, EnvVar, _blank
from flexlb.settings.model_service import _host_port

# Secrets: each variable can also be given as <NAME>_FILE, a file holding the value (Docker / Kubernetes secrets).
# A secret is never echoed in an error or a log line; only the variable is named.
AUTH_VARS: Final[tuple[EnvVar, ...]] = (
    EnvVar("FLEXLB_API_KEYS", None, "Proxy (OpenAI routes): accepted API keys, comma-separated. Unset: open."),
    EnvVar("FLEXLB_SCHEDULE_TOKENS", None, "Schedule API (HTTP and gRPC): accepted client tokens, comma-separated."),
    EnvVar("FLEXLB_ADMIN_TOKEN", None, "Admin API (workers, snapshots): accepted tokens, comma-separated."),
    EnvVar("FLEXLB_ENGINE_API_KEY", None, "Proxy: the key sent to every engine instead of the client's."),
    EnvVar("FLEXLB_ENGINE_API_KEYS", None, 'Proxy: per-engine keys, JSON {"ip:port": "key"}; beats the one above.'),
)
_SECRET_CHARS: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it goes into an HTTP header


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who may call what (docs/security.md). An empty tuple leaves that API open."""

    api_keys: tuple[str, ...] = ()
    schedule_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    engine_api_key: str | None = None
    engine_api_keys: tuple[tuple[str, str], ...] = ()  # (worker id, key)

    def __repr__(self) -> str:  # never the secrets themselves
        return (
            f"AuthSettings(api_keys={len(self.api_keys)}, schedule_tokens={len(self.schedule_tokens)},"
            f" admin_tokens={len(self.admin_tokens)}, engine_api_key={self.engine_api_key is not None},"
            f" engine_api_keys={len(self.engine_api_keys)})"
        )


def _secret_text(environ: Mapping[str, str], name: str) -> tuple[str | None, str]:
    """The variable's value (or its _FILE's content) and where it came from."""
    path = environ.get(f"{name}_FILE")
    if not _blank(path):
        assert path is not None
        where = f"{name}_FILE (environment)"
        if not _blank(environ.get(name)):
            raise ConfigError(f"{where}: set {name} or {name}_FILE, not both")
        try:
            with open(path.strip(), encoding="utf-8") as f:
                return f.read().strip(), where
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path.strip()!r}: {exc.strerror}") from None
    text = environ.get(name)
    return (None if _blank(text) else text.strip()), f"{name} (environment)"  # type: ignore[union-attr]


def _check_secret(value: str, where: str, position: str = "") -> str:
    if not _SECRET_CHARS.fullmatch(value):
        raise ConfigError(f"{where}: key{position} holds a space, a control or a non-ASCII character (not shown)")
    return value


def _secret_list(environ: Mapping[str, str], name: str) -> tuple[tuple[str, ...], str]:
    text, where = _secret_text(environ, name)
    if text is None:
        return (), where
    parts = [part.strip() for part in re.split(r"[,\n]", text)]
    if any(not part for part in parts):
        raise ConfigError(f"{where}: an empty key in the list (two commas, or a trailing one)")
    return tuple(_check_secret(part, where, f" {i + 1}") for i, part in enumerate(parts)), where


def _engine_keys(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    text, where = _secret_text(environ, "FLEXLB_ENGINE_API_KEYS")
    if text is None:
        return ()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:  # the message quotes no part of the document
        raise ConfigError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise ConfigError(f'{where}: expected a JSON object {{"ip:port": "key", ...}}')
    out = []
    for worker_id, key in document.items():
        _host_port(worker_id, where)
        out.append((worker_id.strip(), _check_secret(key.strip(), where, f" of {worker_id.strip()}")))
    return tuple(out)


def parse_auth_settings(environ: Mapping[str, str]) -> AuthSettings:
    """The keys and tokens of every API; one secret in two of them is refused (least privilege)."""
    lists = {
        name: _secret_list(environ, name)
        for name in ("FLEXLB_API_KEYS", "FLEXLB_SCHEDULE_TOKENS", "FLEXLB_ADMIN_TOKEN")
    }
    seen: dict[str, str] = {}
    for name, (values, _) in lists.items():
        for value in values:
            if seen.get(value, name) != name:
                raise ConfigError(f"{name}: a key is also in {seen[value]}; give each API its own keys")
            seen[value] = name
    engine_key, where = _secret_text(environ, "FLEXLB_ENGINE_API_KEY")
    return AuthSettings(
        api_keys=lists["FLEXLB_API_KEYS"][0],
        schedule_tokens=lists["FLEXLB_SCHEDULE_TOKENS"][0],
        admin_tokens=lists["FLEXLB_ADMIN_TOKEN"][0],
        engine_api_key=None if engine_key is None else _check_secret(engine_key, where),
        engine_api_keys=_engine_keys(environ),
    )
