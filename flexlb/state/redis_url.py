"""``REDIS_URL`` in its three deployments: one Redis, a Redis Cluster, a primary/replicas set behind Sentinel.

    redis://[[user]:password@]host:port[/db]       rediss://...   unix://[[user]:password@]/path[?db=N]
    redis+cluster://[[user]:password@]host:port[,host:port...]            (rediss+cluster:// with TLS)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/db][?sentinel_password=...]
                                                                          (rediss+sentinel:// with TLS)

Cluster: the nodes are seeds; the client learns the rest (and which node owns each service's slot) from them.
Sentinel: the nodes are the sentinels; the user and password are the data nodes' (``sentinel_password``: the
sentinels', when they have one). Parsing never echoes a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

Kind = Literal["single", "cluster", "sentinel"]
SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


class RedisUrlError(ValueError):
    """A REDIS_URL that cannot be used; the message never holds the password."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: Kind
    url: str  # single: the URL as given; else the URL itself (kept for siblings and logs via ``describe``)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: seed nodes; sentinel: the sentinels
    master_name: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    sentinel_password: str | None = None

    def describe(self) -> str:
        """For logs and errors: the deployment and its nodes, never a password."""
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "cluster":
            return f"Redis Cluster (seeds {nodes})"
        if self.kind == "sentinel":
            return f"Sentinel master {self.master_name!r} (sentinels {nodes})"
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and check a REDIS_URL; raises :class:`RedisUrlError` naming what is wrong (only the scheme is echoed)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise RedisUrlError(f"expected one of {', '.join(s + '://' for s in SCHEMES)}, got {scheme or 'no scheme'}")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    rest = url.partition("://")[2]
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:  # redis://secret@host is a password alone, as redis-py reads it
            username, password = None, unquote(user)
    nodes = tuple(_host_port(h, scheme) for h in hosts.split(",") if h)
    if not nodes:
        raise RedisUrlError(f"{scheme}:// needs at least one host:port")
    params = parse_qs(query)
    tls = scheme.startswith("rediss")
    if scheme in CLUSTER_SCHEMES:
        if path.strip("/") not in ("", "0"):
            raise RedisUrlError("a Redis Cluster has only database 0")
        return RedisTarget("cluster", url, nodes, None, username, password, 0, tls)
    name, _, db_text = path.partition("/")
    if not name:
        raise RedisUrlError(f"{scheme}:// needs the master name: {scheme}://host:port/<master name>")
    if db_text and not db_text.isdigit():
        raise RedisUrlError(f"{scheme}://: the database after the master name must be a number")
    sentinel_password = params.get("sentinel_password", [None])[0]
    return RedisTarget("sentinel", url, nodes, unquote(name), username, password, int(db_text or 0), tls,
                       sentinel_password)  # fmt: skip


def _host_port(text: str, scheme: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise RedisUrlError(f"{scheme}://: each node must be host:port")
    return host.strip("[]"), int(port)
