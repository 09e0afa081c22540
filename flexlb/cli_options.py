"""Command-line flags that operators know from SGLang's router (smg) and vllm-router, turned into flexlb settings.

The flags do not make options themselves: ``flag_environment`` turns them into the environment variables flexlb
already reads (UPPER_SNAKE FLEXLB_CONFIG fields, MODEL_SERVICE_CONFIG), and ``flexlb.settings.load_settings`` parses
those as it parses any environment, with the same checks. So the precedence is flags > environment > defaults: a
flag's variable replaces the one set outside, and an UPPER_SNAKE variable already beats FLEXLB_CONFIG's JSON. Worker
flags add workers to MODEL_SERVICE_CONFIG's (one worker listed twice is an error, as in MODEL_SERVICE_CONFIG).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from flexlb.domain import EngineKind

# smg / vllm-router policy -> (flexlb strategy of PREFILL and PDFUSION workers, of DECODE workers or None: its
# default). cache_aware routes by prefix match and load: flexlb's SHORTEST_TTFT (KV-cache hit, tokens left, queue).
# power_of_two picks the less loaded of two sampled workers: LOWEST_CONCURRENCY picks the least loaded of all.
POLICIES: Final[Mapping[str, tuple[str, str | None]]] = {
    "cache_aware": ("SHORTEST_TTFT", None),
    "prefix_aware": ("SHORTEST_TTFT", None),
    "kvaware": ("SHORTEST_TTFT", None),
    "round_robin": ("ROUND_ROBIN", "ROUND_ROBIN"),
    "roundrobin": ("ROUND_ROBIN", "ROUND_ROBIN"),
    "random": ("RANDOM", "RANDOM"),
    "power_of_two": ("LOWEST_CONCURRENCY", "LOWEST_CONCURRENCY"),
    "least_load": ("LOWEST_CONCURRENCY", "LOWEST_CONCURRENCY"),
}


class FlagError(ValueError):
    """A flag's value is wrong; the message names the flag."""


class UsageError(Exception):
    """A command's arguments do not make sense together, or it lacks what it needs; `flexlb` prints it and exits 2."""


def port(text: str) -> int:
    """argparse type of a listening port: 0 (any free port) to 65535."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range 0-65535")
    return number


def worker_address(url: str, flag: str) -> str:
    """``http://host:port``, ``host:port`` or ``[v6]:port`` -> ``host:port`` as MODEL_SERVICE_CONFIG lists it."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme != "http":
        raise FlagError(f"{flag} {url}: flexlb sends plain HTTP to workers; expected http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise FlagError(f"{flag} {url}: expected http://host:port without a path")
    try:
        number = parts.port
    except ValueError:
        raise FlagError(f"{flag} {url}: the port is not a number in 1-65535") from None
    if not parts.hostname:
        raise FlagError(f"{flag} {url}: no host")
    if number is None:
        number = 80
    if number == 0:
        raise FlagError(f"{flag} {url}: port 0 is not a worker's port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{number}"


def _bootstrap_ports(prefill: Sequence[Sequence[str]]) -> set[int]:
    ports = set()
    for item in prefill:
        if len(item) > 2:
            raise FlagError(f"--prefill {' '.join(item)}: expected URL [BOOTSTRAP_PORT]")
        if len(item) == 2 and item[1].lower() != "none":
            try:
                ports.add(port(item[1]))
            except argparse.ArgumentTypeError as exc:
                raise FlagError(f"--prefill {item[0]} {item[1]}: bootstrap {exc}") from None
    return ports


def _service_document(environ: Mapping[str, str]) -> dict[str, object] | None:
    """MODEL_SERVICE_CONFIG as a dict, or None when it is not one (load_settings then reports it)."""
    text = environ.get("MODEL_SERVICE_CONFIG", "")
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def flag_environment(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables ``flexlb serve``'s operator flags stand for (only those the flags set)."""
    out: dict[str, str] = {}
    policy = getattr(args, "policy", None)
    if policy is not None:
        strategy, decode = POLICIES[policy]
        out["LOAD_BALANCE_STRATEGY"] = strategy
        if decode is not None:
            out["DECODE_LOAD_BALANCE_STRATEGY"] = decode
    timeout = getattr(args, "request_timeout_secs", None)
    if timeout is not None:
        if timeout <= 0:
            raise FlagError(f"--request-timeout-secs must be positive, got {timeout:g}")
        ms = str(max(1, round(timeout * 1000)))
        out["PROXY_RESPONSE_TIMEOUT_MS"] = ms  # an answer not streamed: until it is in
        out["PROXY_HEADERS_TIMEOUT_MS"] = ms  # a stream: until its headers (the stream itself has no limit)

    prefill = getattr(args, "prefill", None) or []
    lists = {
        "pd_fusion_endpoint": [worker_address(u, "--worker-urls") for u in getattr(args, "worker_urls", None) or []],
        "prefill_endpoint": [worker_address(item[0], "--prefill") for item in prefill],
        "decode_endpoint": [worker_address(u, "--decode") for u in getattr(args, "decode", None) or []],
    }
    bootstrap = _bootstrap_ports(prefill)
    if len(bootstrap) > 1:
        raise FlagError(
            f"--prefill: bootstrap ports {sorted(bootstrap)} differ; flexlb writes one bootstrap_port into every"
            " disaggregated request (bootstrapPort): give each prefill worker the same"
        )
    if bootstrap:
        out["BOOTSTRAP_PORT"] = str(bootstrap.pop())
    if any(lists.values()):
        document = _service_document(environ)
        if document is not None:
            engine = EngineKind.parse(getattr(args, "engine", None) or EngineKind.RTP_LLM.value).value
            entry: dict[str, object] = {"group": ""}
            for key, addresses in lists.items():
                if addresses:
                    entry[key] = {"address": addresses, "engine": engine}
            entries = document.get("role_endpoints") or []
            document["role_endpoints"] = [*entries, entry] if isinstance(entries, list) else entries
            out["MODEL_SERVICE_CONFIG"] = json.dumps(document)
    return out


def add_operator_flags(serve: argparse.ArgumentParser) -> None:
    """smg / vllm-router flags on ``flexlb serve`` (docs/configuration.md, "Command-line flags")."""
    group = serve.add_argument_group("workers and policy (as SGLang's and vLLM's routers name them)")
    group.add_argument("--worker-urls", nargs="+", metavar="URL", help="prefill+decode (PDFUSION) workers")
    group.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="a prefill worker, and its KV bootstrap port (repeatable)",
    )
    group.add_argument("--decode", action="append", metavar="URL", help="a decode worker (repeatable)")
    group.add_argument(
        "--engine",
        choices=[k.value for k in EngineKind],
        help="engine of the workers given by these flags (how their load is read; default rtp_llm)",
    )
    group.add_argument(
        "--policy",
        choices=list(POLICIES),
        help="routing policy, mapped onto flexlb's strategies (cache_aware: SHORTEST_TTFT; round_robin; random;"
        " power_of_two: LOWEST_CONCURRENCY)",
    )
    group.add_argument(
        "--request-timeout-secs",
        type=float,
        metavar="SECONDS",
        help="proxy: time until a worker's answer (a stream: until its headers)",
    )
