"""`flexlb bench peers`, the pure part: which routers run (flexlb, smg, vllm-router), in what order, with what
command line and environment, one run's row, the rows combined per router, the issue's targets and the table.

The I/O (starting processes, sending the workload) is in ``flexlb.bench.peers_run``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlb.bench.client import RequestRecord
from flexlb.bench.report import Target, latency_summary
from flexlb.bench.tables import num, pct, table, worker_balance
from flexlb.master.prom_text import read_samples

FLEXLB = "flexlb"
VENV_VARIABLE = "FLEXLB_PEERS_VENV"
DEAD_ADDRESS = "http://127.0.0.1:9"  # discard port: nothing listens, so a download attempt fails at once
MOONCAKE_TRACES = "the public Mooncake repository (kvcache-ai/Mooncake, folder FAST25-release/traces)"


class PeerError(ValueError):
    """A peer named on the command line cannot be used (the message names the option)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another router that `bench peers` can put in front of the same simulated workers."""

    name: str  # also its executable and its PyPI package
    option: str  # the command-line option naming its executable
    load_format: str  # the workers' GET /get_load shape it reads (flexlb sim-worker --load-format)

    def install_hint(self) -> str:
        return (
            f"install it in a venv of its own: python -m venv /tmp/peers && /tmp/peers/bin/pip install {self.name}; "
            f"then pass {self.option} /tmp/peers/bin/{self.name} or set {VENV_VARIABLE}=/tmp/peers"
        )

    def command(self, binary: str, port: int, metrics_port: int, worker_urls: Sequence[str], policy: str) -> list[str]:
        """Its command line: on loopback only, Prometheus too, in front of ``worker_urls``."""
        common = [
            "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        ]  # fmt: skip
        if self.name == "smg":
            # HTTP cache-aware routing matches characters: no tokenizer is needed, so none is fetched.
            return [binary, "launch", *common, "--disable-tokenizer-autoload", "--log-level", "warn"]
        return [binary, *common, "--log-level", "warning"]


PEERS: dict[str, Peer] = {
    "smg": Peer("smg", "--smg-bin", "sglang"),
    "vllm-router": Peer("vllm-router", "--vllm-router-bin", "vllm"),
}


def peer_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with every model-hub and proxy variable pointing at a dead loopback address (a peer that tries to
    download a tokenizer for the model name a worker reports fails at once instead of reaching out), and loopback
    exempt from the proxy (the peers' HTTP clients honour HTTP_PROXY for the workers too)."""
    dead = {name: DEAD_ADDRESS for name in ("HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    return {
        **base,
        **dead,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@dataclass(frozen=True, slots=True)
class Found:
    """A peer's executable, or why it is skipped."""

    peer: Peer
    binary: str | None
    reason: str = ""


def find_peer(peer: Peer, explicit: str | None, env: Mapping[str, str]) -> Found:
    """``explicit`` (its option's value) when given, else the executable on PATH, else in ``$FLEXLB_PEERS_VENV/bin``.

    An explicit path that is no executable is an error (PeerError): the user asked for that one."""
    if explicit:
        path = shutil.which(explicit, path=env.get("PATH"))
        if path is None:
            raise PeerError(f"{peer.option} {explicit}: no such executable file")
        return Found(peer, path)
    path = shutil.which(peer.name, path=env.get("PATH"))
    if path is not None:
        return Found(peer, path)
    venv = env.get(VENV_VARIABLE)
    if venv:
        candidate = Path(venv) / "bin" / peer.name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return Found(peer, str(candidate))
    where = f"not on PATH, nor in ${VENV_VARIABLE}/bin ({venv})" if venv else f"not on PATH (${VENV_VARIABLE} unset)"
    return Found(peer, None, f"{peer.name} is not installed ({where}): {peer.install_hint()}")


def parse_peers(text: str) -> list[Peer]:
    """``--peers``: a comma-separated list of peer names, or ``none``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise PeerError(f"--peers {text!r}: expected 'none' or names among {', '.join(PEERS)}")
    return [PEERS[n] for n in dict.fromkeys(names)]


def parse_counts(option: str, text: str) -> tuple[int, ...]:
    """``--routers 1,4``: distinct positive replica counts, in the order given."""
    try:
        counts = tuple(dict.fromkeys(int(n) for n in text.split(",") if n.strip()))
    except ValueError:
        raise PeerError(f"{option} {text!r}: expected numbers separated by commas, e.g. 1,4") from None
    if not counts or min(counts) < 1:
        raise PeerError(f"{option} {text!r}: every count must be at least 1")
    return counts


@dataclass(frozen=True, slots=True)
class RouterTarget:
    """One router and how many replicas of it the client spreads the requests over."""

    router: str  # "flexlb" or a peer's name
    replicas: int

    @property
    def label(self) -> str:
        return f"{self.router} x{self.replicas}"


def plan_targets(
    flexlb_routers: Sequence[int], peers: Sequence[Peer], peer_routers: Sequence[int]
) -> list[RouterTarget]:
    """flexlb then each peer, for each replica count (in increasing order)."""
    out = []
    for n in sorted({*flexlb_routers, *peer_routers}):
        if n in flexlb_routers:
            out.append(RouterTarget(FLEXLB, n))
        if n in peer_routers:
            out += [RouterTarget(p.name, n) for p in peers]
    return out


def run_order(targets: Sequence[RouterTarget], repeats: int) -> list[tuple[int, RouterTarget]]:
    """(repeat, target) interleaved: every target once per repeat, so drift on a shared machine hits all alike."""
    return [(r, t) for r in range(1, repeats + 1) for t in targets]


def _refused(record: RequestRecord) -> bool:
    return record.status is not None and record.status != 200


def run_row(
    records: Sequence[RequestRecord],
    elapsed_s: float,
    workers: Sequence[dict[str, Any]] | None,
    router_cpu_s: float | None,
    control_cpu_s: float | None = None,
) -> dict[str, Any]:
    """One run: refused (an HTTP status other than 200), other errors (timeouts, broken streams), TTFT of the
    successful requests, the workers' own hit ratio and the busiest worker's share of the requests."""
    ok = [r for r in records if r.ok]
    refused = [r for r in records if not r.ok and _refused(r)]
    failed = [r for r in records if not r.ok and not _refused(r)]
    hit, busiest = worker_balance({"workers": list(workers or [])})
    rows = [w for w in workers or [] if "error" not in w]
    return {
        "requests": len(records),
        "ok": len(ok),
        "refused": len(refused),
        "refused_reasons": dict(Counter(r.error for r in refused).most_common(5)),
        "errors": len(failed),
        "error_reasons": dict(Counter(r.error for r in failed).most_common(5)),
        "elapsed_s": elapsed_s,
        "ttft_ms": latency_summary([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "ttft_values_ms": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "prompt_tokens": sum(w.get("prompt_tokens") or 0 for w in rows),
        "cached_tokens": sum(w.get("cached_tokens") or 0 for w in rows),
        "hit_ratio": hit,
        "busiest_share": busiest,
        "router_cpu_s": router_cpu_s,
        "control_cpu_s": control_cpu_s,
        "workers": list(workers or []),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else None


_HITS = "flexlb_cache_hit_tokens_total"  # kind="chosen": on the workers chosen; kind="available": the best any held
_PREDICTED = "flexlb_proxy_predicted_hit_tokens_total"
_REPORTED = "flexlb_proxy_reported_cached_tokens_total"


def router_hits(pages: Sequence[str]) -> dict[str, float]:
    """flexlb's own account of its cache routing, summed over its routers' ``/metrics`` pages: the hit tokens of the
    workers it chose and of the best worker for each request (``chosen`` / ``available``: equal when it always took
    the best cached one), and the cached tokens it predicted against those the workers reported (equal when its
    index matched the workers' caches)."""
    out = {"chosen": 0.0, "available": 0.0, "predicted": 0.0, "reported": 0.0}
    for page in pages:
        samples = read_samples(page, (_HITS, _PREDICTED, _REPORTED))
        for labels, value in samples.series.get(_HITS, ()):
            if labels.get("kind") in ("chosen", "available"):
                out[labels["kind"]] += value
        out["predicted"] += samples.total(_PREDICTED) or 0.0
        out["reported"] += samples.total(_REPORTED) or 0.0
    return out


def render_router_hits(label: str, hits: Mapping[str, float]) -> str:
    def share(part: float, whole: float) -> str:
        return pct(part / whole) if whole else "-"

    line = (
        f"{label}, by its own metrics: chose workers holding {share(hits['chosen'], hits['available'])} of the best"
        f" available hit tokens; predicted {hits['predicted']:,.0f} cached tokens where the workers reported"
        f" {hits['reported']:,.0f} ({share(hits['reported'], hits['predicted'])})"
    )
    if hits["available"] and hits["chosen"] >= 0.995 * hits["available"]:
        line += ": what the hit ratio lacks of the oracle's is prefixes no worker held any more (evicted)"
    return line


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A target's runs together: TTFT over all their requests, counts per run, hit ratio over all prompt tokens."""
    ttft = [v for r in runs for v in r["ttft_values_ms"]]
    prompt = sum(r["prompt_tokens"] for r in runs)
    return {
        "runs": len(runs),
        "requests_per_run": [r["requests"] for r in runs],
        "refused_per_run": [r["refused"] for r in runs],
        "errors_per_run": [r["errors"] for r in runs],
        "ttft_ms": latency_summary(ttft),
        "ttft_mean_per_run_ms": [r["ttft_ms"]["mean"] for r in runs],
        "hit_ratio": sum(r["cached_tokens"] for r in runs) / prompt if prompt else None,
        "busiest_share": _mean([r["busiest_share"] for r in runs]),
        "router_cpu_s": _mean([r["router_cpu_s"] for r in runs]),
        "control_cpu_s": _mean([r["control_cpu_s"] for r in runs]),
        "router_hits": _summed([r.get("router_hits") for r in runs]),
    }


def _summed(parts: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    present = [p for p in parts if p is not None]
    return {k: sum(p[k] for p in present) for k in present[0]} if present else None


def _span(values: Sequence[int]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def render_table(combined: Mapping[str, dict[str, Any]]) -> list[str]:
    """One row per target (label -> ``combine`` result)."""
    rows = []
    for label, c in combined.items():
        t = c["ttft_ms"]
        rows.append(
            [
                label,
                str(c["runs"]),
                _span(c["requests_per_run"]),
                _span(c["refused_per_run"]),
                _span(c["errors_per_run"]),
                num(t.get("mean")),
                num(t.get("p50")),
                num(t.get("p99")),
                " / ".join(num(m, 0) for m in c["ttft_mean_per_run_ms"]),
                pct(c["hit_ratio"]),
                pct(c["busiest_share"]),
                num(c["router_cpu_s"], 2),
                num(c["control_cpu_s"], 2),
            ]
        )
    header = [
        "router", "runs", "requests", "refused", "errors", "TTFT mean", "TTFT p50", "TTFT p99", "mean per run",
        "worker hit", "busiest worker", "router CPU s", "master+redis CPU s",
    ]  # fmt: skip
    return table(rows, header, [False] + [True] * (len(header) - 1))


ORACLE_SHARE = 0.95  # issue 11: the workers' hit ratio within 5% of the oracle's bound


def oracle_hit_ratio(specs: Sequence[Any], block_size: int) -> float | None:
    """The most any placement can reach on ``specs`` (RequestSpec: rendered prompt, max_tokens): every request on a
    worker holding the longest prefix any earlier request had, with infinite KV (flexlb.bench.oracle)."""
    from flexlb.bench.oracle import OracleCosts, OracleRequest, oracle_bound

    requests = [OracleRequest.from_prompt(s.rendered(), max(s.max_tokens, 1), block_size) for s in specs]
    return oracle_bound(requests, OracleCosts(block_size=block_size)).hit_ratio


def _better_peer(combined: Mapping[str, dict[str, Any]], peers: Sequence[str], replicas: int) -> list[str]:
    """The peers' labels to compare flexlb x``replicas`` with: the same replica count, else their single replica."""
    for n in (replicas, 1):
        labels = [RouterTarget(p, n).label for p in peers if RouterTarget(p, n).label in combined]
        if labels:
            return labels
    return []


def check_targets(
    combined: Mapping[str, dict[str, Any]], peers: Sequence[str], oracle_hit_ratio: float | None = None
) -> list[Target]:
    """Issue 11's targets, for each flexlb replica count measured with at least one peer to compare with: zero
    refused where the peers refused none; mean TTFT <= 0.75x the better peer's (1 router) or 0.5x (several);
    with 1 router, the workers' hit ratio >= the better peer's; and, given the oracle's bound (with or without
    peers), with 1 router the workers' hit ratio within 5% of it."""
    out: list[Target] = []
    for label, c in combined.items():
        router, _, count = label.rpartition(" x")
        if router != FLEXLB:
            continue
        n = int(count)
        if n == 1 and oracle_hit_ratio:
            goal = ORACLE_SHARE * oracle_hit_ratio
            out.append(Target(f"{label}: workers' hit ratio (>= 95% of the oracle's)", goal, True, c["hit_ratio"]))
        others = _better_peer(combined, peers, n)
        if not others:
            continue
        against = ", ".join(others)
        if all(sum(combined[o]["refused_per_run"]) == 0 for o in others):
            refused = float(sum(c["refused_per_run"]))
            out.append(Target(f"{label}: requests refused, all runs (peers {against}: none)", 0, False, refused))
        means = [m for o in others if (m := combined[o]["ttft_ms"].get("mean")) is not None and not math.isnan(m)]
        if means:
            factor = 0.75 if n == 1 else 0.5
            goal = factor * min(means)
            out.append(
                Target(f"{label}: mean TTFT ms (<= {factor}x best of {against})", goal, False, c["ttft_ms"]["mean"])
            )
        hits = [h for o in others if (h := combined[o]["hit_ratio"]) is not None]
        if n == 1 and hits:
            out.append(Target(f"{label}: workers' hit ratio (>= best of {against})", max(hits), True, c["hit_ratio"]))
    return out


def render_targets(targets: Sequence[Target]) -> list[str]:
    rows = []
    for t in targets:
        j = t.to_json()
        show = pct if "hit ratio" in t.name else num
        rows.append([t.name, f"{j['goal'].split()[0]} {show(t.goal)}", show(t.value), j["result"]])
    return table(rows, ["target", "goal", "measured", "result"], [False, True, True, False]) if rows else []
