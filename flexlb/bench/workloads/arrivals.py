"""When requests are sent: Poisson or fixed-rate offsets (open loop), trace timestamps, or a closed loop."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from flexlb.bench.workloads.spec import RequestSpec

ArrivalKind = Literal["poisson", "fixed", "trace", "closed"]


@dataclass(frozen=True, slots=True)
class Arrivals:
    """``poisson`` / ``fixed``: open loop at ``rate`` requests/s; ``trace``: the workload's own ``arrival_s``;
    ``closed``: ``concurrency`` clients, each sending its next request when the previous one finished."""

    kind: ArrivalKind
    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.kind in ("poisson", "fixed") and not (self.rate and self.rate > 0):
            raise ValueError(f"{self.kind} arrivals need a rate > 0, got {self.rate}")
        if self.kind == "closed" and not (self.concurrency and self.concurrency >= 1):
            raise ValueError(f"a closed loop needs a concurrency >= 1, got {self.concurrency}")

    @property
    def open_loop(self) -> bool:
        return self.kind != "closed"

    def describe(self) -> str:
        if self.kind == "closed":
            return f"closed loop, concurrency {self.concurrency}"
        if self.kind == "trace":
            return "trace timestamps"
        return f"{self.kind} arrivals at {self.rate:g} req/s"


def poisson_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Send times of a Poisson process at ``rate``/s: the first at 0, then exponential gaps of mean 1/rate."""
    offsets, t = [], 0.0
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


def fixed_offsets(count: int, rate: float) -> list[float]:
    """Evenly spaced send times: i / rate."""
    return [i / rate for i in range(count)]


def apply_arrivals(specs: Sequence[RequestSpec], arrivals: Arrivals, rng: random.Random) -> list[RequestSpec]:
    """The specs with ``arrival_s`` set by ``arrivals`` (kept as they are for ``trace`` and ``closed``)."""
    if arrivals.kind == "poisson":
        assert arrivals.rate is not None
        offsets = poisson_offsets(len(specs), arrivals.rate, rng)
    elif arrivals.kind == "fixed":
        assert arrivals.rate is not None
        offsets = fixed_offsets(len(specs), arrivals.rate)
    else:
        return list(specs)
    return [dataclasses.replace(spec, arrival_s=t) for spec, t in zip(specs, offsets, strict=True)]
