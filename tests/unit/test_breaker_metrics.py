"""The proxy's circuit breakers in Prometheus: ``flexlb_proxy_breaker_state`` (0 closed, 1 half open, 2 open) and
``flexlb_proxy_breaker_trips_total`` per worker, told by flexlb.proxy.breaker as each change happens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from flexlb.proxy.breaker import Breakers
from flexlb.proxy.metrics import ProxyMetrics


def test_state_and_trips_follow_the_breaker() -> None:
    registry = CollectorRegistry()
    now = [0.0]
    b = Breakers(failure_threshold=2, cooldown_s=5.0, clock=lambda: now[0], observer=ProxyMetrics(registry))

    def state(worker: str = "w1") -> float | None:
        return registry.get_sample_value("flexlb_proxy_breaker_state", {"worker": worker})

    def trips(worker: str = "w1") -> float | None:
        return registry.get_sample_value("flexlb_proxy_breaker_trips_total", {"worker": worker})

    b.failed("w1", "w1")
    assert state() is None and trips() is None  # below the threshold: no series yet
    b.failed("w1", "w1")
    assert (state(), trips(), b.state("w1")) == (2.0, 1.0, "open")
    now[0] = 5.0
    assert state() == 2.0  # cool-down over: open until a request probes
    b.sending(["w1"])
    assert (state(), b.state("w1")) == (1.0, "half_open")
    now[0] = 10.0  # a probe that never ended: the next request probes again, still half open
    b.sending(["w1"])
    assert state() == 1.0
    b.failed("w1", "w1")  # the probe failed: open again, one more trip
    assert (state(), trips()) == (2.0, 2.0)
    now[0] = 15.0
    b.sending(["w1"])
    b.answered("w1", "w1")
    assert (state(), trips(), b.state("w1")) == (0.0, 2.0, "closed")
    b.answered("w1", "w1")  # closed already: nothing changes
    b.sending(["w2"])
    b.answered("w2", "w2")  # never failed: no series
    assert state("w2") is None and trips("w2") is None
