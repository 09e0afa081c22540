"""The ``Authorization`` a proxied request carries to its engine: the engine's own key when one is configured
(``FLEXLB_ENGINE_API_KEYS`` for that worker, else ``FLEXLB_ENGINE_API_KEY``), otherwise the client's header as it
came (an engine started with ``--api-key`` then checks the client's key itself). Never logged."""

from __future__ import annotations

from collections.abc import Mapping

from flexlb.settings import AuthSettings

_HEADER = b"Authorization: "


class UpstreamAuth:
    def __init__(self, default_key: str | None = None, per_worker: Mapping[str, str] | None = None) -> None:
        self._default = _line(f"Bearer {default_key}") if default_key else None
        self._per_worker = {worker: _line(f"Bearer {key}") for worker, key in (per_worker or {}).items()}

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> UpstreamAuth:
        return cls(auth.engine_api_key, dict(auth.engine_api_keys))

    def header(self, worker_id: str, client_authorization: str | None) -> bytes:
        """The header line (with its CRLF) for a request to ``worker_id``, or b"" for none."""
        line = self._per_worker.get(worker_id) or self._default
        if line is not None:
            return line
        if client_authorization is None:
            return b""
        value = client_authorization.encode("utf-8", "surrogateescape")
        # aiohttp's parser refuses CR / LF in a header already; this keeps a raw head safe whatever parses it.
        if b"\r" in value or b"\n" in value:
            return b""
        return _HEADER + value + b"\r\n"


def _line(value: str) -> bytes:
    return _HEADER + value.encode("latin-1") + b"\r\n"
