"""The JSON document of one `flexlb bench run`: configuration, environment, summary, workers, request records."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flexlb.bench.client import RequestRecord
from flexlb.bench.run import RunOptions, RunOutcome
from flexlb.bench.stats import summarize

RESULT_KIND = "run"


class ResultError(ValueError):
    """A file that is not a `flexlb bench run` result."""


def _version() -> str:
    try:
        return importlib.metadata.version("flexlb")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def build_result(
    *,
    label: str,
    workload: str,
    workload_params: Any,
    options: RunOptions,
    seed: int,
    planned: int,
    num_requests: int | None,
    outcome: RunOutcome,
) -> dict[str, Any]:
    return {
        "benchmark": RESULT_KIND,
        "label": label,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "target": options.target,
            "workload": workload,
            "workload_params": dataclasses.asdict(workload_params),
            "arrivals": {**dataclasses.asdict(options.arrivals), "description": options.arrivals.describe()},
            "duration_s": options.duration_s,
            "num_requests": num_requests,
            "requests_planned": planned,
            "seed": seed,
            "model": options.model,
            "request_timeout_s": options.request_timeout_s,
            "ignore_eos": options.ignore_eos,
            "worker_metrics": list(options.worker_metrics),
        },
        "environment": {
            "flexlb_version": _version(),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "aiohttp_version": aiohttp.__version__,
        },
        "interrupted": outcome.interrupted,
        "summary": summarize(outcome.records, outcome.elapsed_s),
        "workers": outcome.workers,
        "requests": [r.to_json() for r in outcome.records],
    }


def load_result(path: str | Path) -> dict[str, Any]:
    """A result written by `flexlb bench run`; raises ResultError for anything else."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ResultError(f"{path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ResultError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("benchmark") != RESULT_KIND or not isinstance(data.get("summary"), dict):
        raise ResultError(f"{path}: not a `flexlb bench run` result")
    return data


def records_of(result: dict[str, Any]) -> list[RequestRecord]:
    return [RequestRecord.from_json(r) for r in result.get("requests") or []]
