"""Prometheus metrics (SPEC §6), fed by the resilience core of every route.

``Metrics`` is an ``IRouteObserver``: the core reports attempts, retries and finished
requests to it, so every protocol, third-party ones included, gets the metrics without
writing metrics code.  It keeps its own ``CollectorRegistry`` (one per process, never
the global one, so tests and embedders can build several).  Labels are routes,
members, results and directions only: cardinality stays bounded by the config.

Breaker states and active connections are read from the routes' cores when scraped,
not kept up to date by events: open -> half-open is computed lazily by the breaker
(no timer), so only a read at scrape time tells the truth.

``prometheus_client.twisted`` is never imported: it imports the global reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from zope.interface import implementer

from ambassador.interfaces import IRouteObserver
from ambassador.resilience.breaker import STATE_VALUES

#: Proxied requests take from well under a millisecond (loopback) to minutes (a tcp
#: connection's lifetime), so the buckets span more than prometheus_client's default.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)

#: The classic text format, which every Prometheus (and every other scraper) reads;
#: prometheus_client 0.22+ announces version=1.0.0, which only Prometheus 3 knows, for
#: the same bytes when every name is a classic one, as ours are.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Bytes sent towards the members (RequestRecord.bytesIn: what the app sent us) and
#: bytes sent to the app (RequestRecord.bytesOut).
UPSTREAM = "upstream"
DOWNSTREAM = "downstream"


class _WithoutCreated:
    """The registry as scraped, without the ``*_created`` samples prometheus_client adds
    to counters and histograms: SPEC §6 names exactly the series a scrape shows, and
    turning them off globally (``disable_created_metrics``) would change other users
    of prometheus_client in the process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _RouteState:
    """The scrape-time collector: gauges read from the routes' cores."""

    def __init__(self, cores: Callable[[], Iterable[Any]]) -> None:
        self._cores = cores

    def collect(self) -> Iterator[GaugeMetricFamily]:
        breakers = GaugeMetricFamily(
            "ambassador_breaker_state",
            "Breaker state of each member: 0 closed, 1 half-open, 2 open.",
            labels=["route", "upstream"],
        )
        active = GaugeMetricFamily(
            "ambassador_active_connections",
            "Downstream (app) connections open now.",
            labels=["route"],
        )
        for core in self._cores():
            active.add_metric([core.name], core.activeConnections)
            for member in core.members:
                breakers.add_metric(
                    [core.name, member.upstream], STATE_VALUES[member.breaker.state]
                )
        yield breakers
        yield active

    def describe(self) -> list[GaugeMetricFamily]:
        # Describing without collecting: registering must not read routes that are not
        # built yet.
        return [
            GaugeMetricFamily("ambassador_breaker_state", "", labels=["route", "upstream"]),
            GaugeMetricFamily("ambassador_active_connections", "", labels=["route"]),
        ]


@implementer(IRouteObserver)
class Metrics:
    """Every SPEC §6 metric of one process.

    @param cores: returns the routes' ``RouteCore`` objects now (they change on reload);
        read at scrape time.
    """

    def __init__(self, cores: Callable[[], Iterable[Any]]) -> None:
        self._cores = cores
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ambassador_requests_total", "Requests (tcp: connections) by result.",
            ["route", "result"], registry=r,
        )
        self.attempts = Counter(
            "ambassador_attempts_total", "Upstream attempts by member and result.",
            ["route", "upstream", "result"], registry=r,
        )
        self.retries = Counter(
            "ambassador_retries_total", "Retries decided (counted before their backoff).",
            ["route"], registry=r,
        )
        self.duration = Histogram(
            "ambassador_request_duration_seconds",
            "Request duration (tcp: connection lifetime).",
            ["route"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.bytes = Counter(
            "ambassador_bytes_total",
            "Bytes relayed: upstream = sent towards members, downstream = sent to the app.",
            ["route", "direction"], registry=r,
        )
        self.reloads = Counter(
            "ambassador_config_reloads_total", "Configuration reloads (SIGHUP) by result.",
            ["result"], registry=r,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)
        r.register(_RouteState(cores))
        self._scraped = _WithoutCreated(r)
        # Children by label values: prometheus_client's labels() costs a lock and a
        # validation on every call; the hot path only does a dict lookup.
        self._requests: dict[tuple[str, str], Any] = {}
        self._attempts: dict[tuple[str, str, str], Any] = {}
        self._perRoute: dict[str, tuple[Any, Any, Any, Any]] = {}

    # --- IRouteObserver ----------------------------------------------------------------

    def attemptFinished(self, route: str, member: Any, result: str, duration: float) -> None:
        key = (route, member.upstream, result)
        child = self._attempts.get(key)
        if child is None:
            child = self._attempts[key] = self.attempts.labels(*key)
        child.inc()

    def retried(self, route: str) -> None:
        self._route(route)[0].inc()

    def breakerChanged(self, route: str, member: Any, state: str) -> None:
        """Nothing to do: ambassador_breaker_state is read at scrape time."""

    def requestFinished(self, route: str, record: Any) -> None:
        key = (route, record.result)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
        _, duration, sent, received = self._route(route)
        duration.observe(record.duration)
        if record.bytesIn:
            sent.inc(record.bytesIn)
        if record.bytesOut:
            received.inc(record.bytesOut)

    def connectionsChanged(self, route: str, active: int) -> None:
        """Nothing to do: ambassador_active_connections is read at scrape time."""

    # --- the rest ------------------------------------------------------------------------

    def _route(self, route: str) -> tuple[Any, Any, Any, Any]:
        children = self._perRoute.get(route)
        if children is None:
            children = self._perRoute[route] = (
                self.retries.labels(route),
                self.duration.labels(route),
                self.bytes.labels(route, UPSTREAM),
                self.bytes.labels(route, DOWNSTREAM),
            )
        return children

    def configReloaded(self, ok: bool) -> None:
        """Count a configuration reload (SIGHUP), good or refused."""
        self.reloads.labels("ok" if ok else "error").inc()

    def sync(self) -> None:
        """Make the series of the current routes and members exist (at 0) and drop
        those of routes and members that are gone (reload, DNS), so that a scrape shows
        every metric for every route from the start and cardinality stays bounded."""
        routes: dict[str, set[str]] = {}
        for core in self._cores():
            routes[core.name] = {m.upstream for m in core.members}
            self._route(core.name)
            key = (core.name, "ok")
            if key not in self._requests:
                self._requests[key] = self.requests.labels(*key)
            for upstream in routes[core.name]:
                key3 = (core.name, upstream, "ok")
                if key3 not in self._attempts:
                    self._attempts[key3] = self.attempts.labels(*key3)
        for rkey in [k for k in self._requests if k[0] not in routes]:
            del self._requests[rkey]
            self.requests.remove(*rkey)
        for akey in [k for k in self._attempts if k[1] not in routes.get(k[0], ())]:
            del self._attempts[akey]
            self.attempts.remove(*akey)
        for name in [n for n in self._perRoute if n not in routes]:
            del self._perRoute[name]
            self.retries.remove(name)
            self.duration.remove(name)
            self.bytes.remove(name, UPSTREAM)
            self.bytes.remove(name, DOWNSTREAM)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        self.sync()
        return generate_latest(self._scraped)  # type: ignore[arg-type]
