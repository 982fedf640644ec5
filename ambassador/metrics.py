"""Prometheus metrics (SPEC §6), fed by the resilience core of every route.

``Metrics`` is an ``IRouteObserver``: the core reports attempts, retries and finished
requests to it, so every protocol, third-party ones included, gets the metrics without
writing metrics code.  It exposes them through a ``prometheus_client``
``CollectorRegistry`` of its own (never the global one, so tests and embedders can
build several).  Labels are routes, members, results and directions only:
cardinality stays bounded by the config.

The hot path only adds to plain ints and floats; the collector turns them into metric
families when scraped.  prometheus_client's own ``Counter``/``Histogram`` take a lock
per increment (about 1 µs for ``inc``, 2 µs for ``observe`` measured here), which a
single-threaded reactor does not need, on every request.  Breaker states and active
connections are read from the routes' cores when scraped too: open -> half-open is
computed lazily by the breaker (no timer), so only a read at scrape time tells the
truth.

``prometheus_client.twisted`` is never imported: it imports the global reactor.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from zope.interface import implementer

from ambassador.interfaces import IRouteObserver
from ambassador.resilience.breaker import STATE_VALUES

#: Proxied requests take from well under a millisecond (loopback) to minutes (a tcp
#: connection's lifetime), so the buckets span more than prometheus_client's default.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)
_BUCKET_NAMES = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]

#: The classic text format, which every Prometheus (and every other scraper) reads;
#: prometheus_client 0.22+ announces version=1.0.0, which only Prometheus 3 knows, for
#: the same bytes when every name is a classic one, as ours are.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Bytes sent towards the members (RequestRecord.bytesIn: what the app sent us) and
#: bytes sent to the app (RequestRecord.bytesOut).
UPSTREAM = "upstream"
DOWNSTREAM = "downstream"


class _RouteCounts:
    """One route's unlabelled-but-route counters; a slot each, no lock."""

    __slots__ = ("buckets", "bytesDown", "bytesUp", "count", "retries", "sum")

    def __init__(self) -> None:
        self.retries = 0
        self.bytesUp = 0
        self.bytesDown = 0
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative


@implementer(IRouteObserver)
class Metrics:
    """Every SPEC §6 metric of one process.

    @param cores: returns the routes' ``RouteCore`` objects now (they change on reload);
        read at scrape time.
    @ivar registry: the ``CollectorRegistry`` that holds them (``generate_latest`` it,
        or call :meth:`render`).
    """

    def __init__(self, cores: Callable[[], Iterable[Any]]) -> None:
        self._cores = cores
        self._requests: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._routes: dict[str, _RouteCounts] = {}
        self._reloads = {"ok": 0, "error": 0}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # --- IRouteObserver ----------------------------------------------------------------

    def attemptFinished(
        self, route: str, member: Any, result: str, duration: float, count: int = 1,
    ) -> None:
        key = (route, member.upstream, result)
        attempts = self._attempts
        attempts[key] = attempts.get(key, 0) + count

    def retried(self, route: str) -> None:
        counts = self._routes.get(route) or self._route(route)
        counts.retries += 1

    def breakerChanged(self, route: str, member: Any, state: str) -> None:
        """Nothing to do: ambassador_breaker_state is read at scrape time."""

    def requestFinished(self, route: str, record: Any) -> None:
        key = (route, record.result)
        n = record.count
        requests = self._requests
        requests[key] = requests.get(key, 0) + n
        counts = self._routes.get(route) or self._route(route)
        duration = record.duration
        counts.count += n
        counts.sum += duration * n
        counts.buckets[bisect_left(DURATION_BUCKETS, duration)] += n
        counts.bytesUp += record.bytesIn
        counts.bytesDown += record.bytesOut

    def connectionsChanged(self, route: str, active: int) -> None:
        """Nothing to do: ambassador_active_connections is read at scrape time."""

    # --- the rest ------------------------------------------------------------------------

    def _route(self, route: str) -> _RouteCounts:
        counts = self._routes[route] = _RouteCounts()
        return counts

    def configReloaded(self, ok: bool) -> None:
        """Count a configuration reload (SIGHUP), good or refused."""
        self._reloads["ok" if ok else "error"] += 1

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _sync(self) -> list[Any]:
        """Make the series of the current routes and members exist (at 0) and drop
        those of routes and members that are gone (reload, DNS), so that a scrape shows
        every metric for every route from the start and cardinality stays bounded."""
        cores = list(self._cores())
        members = {core.name: {m.upstream for m in core.members} for core in cores}
        for name, upstreams in members.items():
            if name not in self._routes:
                self._route(name)
            self._requests.setdefault((name, "ok"), 0)
            for upstream in upstreams:
                self._attempts.setdefault((name, upstream, "ok"), 0)
        for key in [k for k in self._requests if k[0] not in members]:
            del self._requests[key]
        for akey in [k for k in self._attempts if k[1] not in members.get(k[0], ())]:
            del self._attempts[akey]
        for name in [n for n in self._routes if n not in members]:
            del self._routes[name]
        return cores

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: every family, read now."""
        cores = self._sync()

        requests = CounterMetricFamily(
            "ambassador_requests_total", "Requests (tcp: connections) by result.",
            labels=["route", "result"],
        )
        for (route, result), value in sorted(self._requests.items()):
            requests.add_metric([route, result], value)
        yield requests

        attempts = CounterMetricFamily(
            "ambassador_attempts_total", "Upstream attempts by member and result.",
            labels=["route", "upstream", "result"],
        )
        for (route, upstream, result), value in sorted(self._attempts.items()):
            attempts.add_metric([route, upstream, result], value)
        yield attempts

        retries = CounterMetricFamily(
            "ambassador_retries_total", "Retries decided (counted before their backoff).",
            labels=["route"],
        )
        duration = HistogramMetricFamily(
            "ambassador_request_duration_seconds",
            "Request duration (tcp: connection lifetime).", labels=["route"],
        )
        bytesTotal = CounterMetricFamily(
            "ambassador_bytes_total",
            "Bytes relayed: upstream = sent towards members, downstream = sent to the app.",
            labels=["route", "direction"],
        )
        for route, counts in sorted(self._routes.items()):
            retries.add_metric([route], counts.retries)
            cumulative, buckets = 0, []
            for name, count in zip(_BUCKET_NAMES, counts.buckets):
                cumulative += count
                buckets.append((name, cumulative))
            duration.add_metric([route], buckets, counts.sum)
            bytesTotal.add_metric([route, UPSTREAM], counts.bytesUp)
            bytesTotal.add_metric([route, DOWNSTREAM], counts.bytesDown)
        yield retries
        yield duration

        breakers = GaugeMetricFamily(
            "ambassador_breaker_state",
            "Breaker state of each member: 0 closed, 1 half-open, 2 open.",
            labels=["route", "upstream"],
        )
        active = GaugeMetricFamily(
            "ambassador_active_connections", "Downstream (app) connections open now.",
            labels=["route"],
        )
        for core in cores:
            active.add_metric([core.name], core.activeConnections)
            for member in core.members:
                breakers.add_metric(
                    [core.name, member.upstream], STATE_VALUES[member.breaker.state]
                )
        yield breakers
        yield active
        yield bytesTotal

        reloads = CounterMetricFamily(
            "ambassador_config_reloads_total", "Configuration reloads (SIGHUP) by result.",
            labels=["result"],
        )
        for result, value in self._reloads.items():
            reloads.add_metric([result], value)
        yield reloads
