"""Metrics (SPEC §6) fed by a route's resilience core, on a fake clock."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ambassador.config import BreakerPolicy, RetryPolicy, Route
from ambassador.interfaces import IRouteObserver
from ambassador.metrics import Metrics
from ambassador.resilience import AttemptFailed, RequestRecord, RouteCore


def makeCore(clock: Clock, observers: list[Any], name: str = "r",
             upstreams: tuple[str, ...] = ("tcp:127.0.0.1:1", "tcp:127.0.0.1:2")) -> RouteCore:
    route = Route(
        name=name, protocol="tcp", listen="tcp:1:interface=127.0.0.1", upstreams=upstreams,
        retry=RetryPolicy(attempts=3, backoffBase=0.01, backoffMax=0.01),
        breaker=BreakerPolicy(failureThreshold=1, resetTimeout=5.0, halfOpenMax=1),
        accessLog=False,
    )
    return RouteCore(route, clock, lambda upstream: None, observers, random=lambda: 0.0)


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.cores: list[RouteCore] = []
        self.metrics = Metrics(lambda: self.cores)
        self.core = makeCore(self.clock, [self.metrics])
        self.cores.append(self.core)

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def test_metrics_is_a_route_observer() -> None:
    assert verifyObject(IRouteObserver, Setup().metrics)


def test_a_retried_request_counts_attempts_retries_and_the_request() -> None:
    s = Setup()
    pending: list[Deferred[Any]] = []

    def attempt(member: Any) -> Deferred[Any]:
        pending.append(Deferred())
        return pending[-1]

    s.core.request(attempt)
    pending[0].errback(AttemptFailed("connect-failure", written=False))
    pending[1].callback("fine")
    s.core.finished(RequestRecord("tcp:127.0.0.1:2", 2, "ok", 0.25, bytesIn=10, bytesOut=20))

    assert s.value("ambassador_attempts_total", route="r", upstream="tcp:127.0.0.1:1",
                   result="connect-failure") == 1
    assert s.value("ambassador_attempts_total", route="r", upstream="tcp:127.0.0.1:2",
                   result="ok") == 1
    assert s.value("ambassador_retries_total", route="r") == 1
    assert s.value("ambassador_requests_total", route="r", result="ok") == 1
    assert s.value("ambassador_request_duration_seconds_count", route="r") == 1
    assert s.value("ambassador_request_duration_seconds_sum", route="r") == 0.25
    assert s.value("ambassador_bytes_total", route="r", direction="upstream") == 10
    assert s.value("ambassador_bytes_total", route="r", direction="downstream") == 20


def test_a_status_result_is_the_status_code() -> None:
    s = Setup()
    d: Deferred[Any] = Deferred()
    s.core.request(lambda member: d, retryOn=())
    d.errback(AttemptFailed("503", response="busy"))
    assert s.value("ambassador_attempts_total", route="r", upstream="tcp:127.0.0.1:1",
                   result="503") == 1


def test_breaker_state_is_read_at_scrape_time_including_lazy_half_open() -> None:
    s = Setup()
    member = s.core.members[0]
    member.breaker.acquire()
    member.breaker.failure()  # threshold 1: open

    def state() -> float | None:
        return s.value("ambassador_breaker_state", route="r", upstream="tcp:127.0.0.1:1")

    assert state() == 2
    s.clock.advance(5.0)  # no event fires: open -> half-open is computed when read
    assert state() == 1
    member.breaker.acquire()
    member.breaker.success()
    assert state() == 0


def test_active_connections_are_read_from_the_core() -> None:
    s = Setup()
    connection = object()
    s.core.admit(connection)
    assert s.value("ambassador_active_connections", route="r") == 1
    s.core.release(connection)
    assert s.value("ambassador_active_connections", route="r") == 0


def test_every_series_exists_from_the_first_scrape() -> None:
    s = Setup()
    text = s.metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("ambassador_requests", "ambassador_attempts", "ambassador_retries",
                 "ambassador_request_duration_seconds", "ambassador_breaker_state",
                 "ambassador_active_connections", "ambassador_bytes",
                 "ambassador_config_reloads"):
        assert families[name].samples, name
    assert "_created" not in text


def test_reloads_are_counted_by_result() -> None:
    s = Setup()
    s.metrics.configReloaded(True)
    s.metrics.configReloaded(False)
    s.metrics.configReloaded(False)
    assert s.value("ambassador_config_reloads_total", result="ok") == 1
    assert s.value("ambassador_config_reloads_total", result="error") == 2


def test_series_of_a_removed_route_go_away() -> None:
    s = Setup()
    other = makeCore(s.clock, [s.metrics], name="gone", upstreams=("tcp:127.0.0.1:3",))
    s.cores.append(other)
    other.finished(RequestRecord("tcp:127.0.0.1:3", 1, "ok", 0.1, bytesIn=1, bytesOut=1))
    s.metrics.render()
    assert s.value("ambassador_requests_total", route="gone", result="ok") == 1
    s.cores.remove(other)
    text = s.metrics.render().decode()
    assert 'route="gone"' not in text
    assert 'route="r"' in text


def test_each_registry_is_its_own() -> None:
    a, b = Setup(), Setup()
    a.core.finished(RequestRecord(None, 0, "breaker-open", 0.0))
    assert a.value("ambassador_requests_total", route="r", result="breaker-open") == 1
    assert b.value("ambassador_requests_total", route="r", result="breaker-open") is None
