"""The admin resource (SPEC §6) against a fake process state, and its service."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.web.test.requesthelper import DummyRequest

from ambassador.admin import AdminResource, AdminService
from ambassador.config import BreakerPolicy, Route
from ambassador.metrics import Metrics
from ambassador.resilience import RouteCore


class FakeRouteService:
    def __init__(self, name: str, clock: Clock, observers: list[Any]) -> None:
        self.route = Route(
            name=name, protocol="tcp", listen="tcp:8080:interface=127.0.0.1",
            upstreams=("tcp:10.0.0.1:80", "tcp:10.0.0.2:80"),
            breaker=BreakerPolicy(failureThreshold=1, resetTimeout=10.0, halfOpenMax=1),
        )
        self.core = RouteCore(self.route, clock, lambda upstream: None, observers)


class FakeAmbassador:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.ready = True
        self.routes: dict[str, FakeRouteService] = {}
        self.metrics = Metrics(lambda: [r.core for r in self.routes.values()])
        for name in ("api", "cache"):
            self.routes[name] = FakeRouteService(name, self.clock, [self.metrics])


def render(ambassador: Any, path: str, method: bytes = b"GET") -> tuple[int, dict[bytes, Any], bytes]:
    pathPart, _, query = path.partition("?")
    request = DummyRequest(pathPart.lstrip("/").split("/"))
    request.method = method
    request.path = pathPart.encode()
    if query:
        key, _, value = query.partition("=")
        request.args = {key.encode(): [value.encode()]}
    body = AdminResource(ambassador).render(request)
    headers = dict(request.responseHeaders.getAllRawHeaders())
    return request.responseCode or 200, headers, body


def test_live_and_ready() -> None:
    ambassador = FakeAmbassador()
    assert render(ambassador, "/live")[0] == 200
    assert render(ambassador, "/ready")[0] == 200
    ambassador.ready = False
    assert render(ambassador, "/ready")[0] == 503
    assert render(ambassador, "/live")[0] == 200


def test_status_document() -> None:
    ambassador = FakeAmbassador()
    member = ambassador.routes["api"].core.members[1]
    member.breaker.acquire()
    member.breaker.failure()
    member.attempts, member.failures = 1, 1
    code, headers, body = render(ambassador, "/status")
    assert code == 200 and headers[b"Content-Type"] == [b"application/json"]
    document = json.loads(body)
    assert [r["name"] for r in document["routes"]] == ["api", "cache"]
    api = document["routes"][0]
    assert api["protocol"] == "tcp" and api["listen"] == "tcp:8080:interface=127.0.0.1"
    assert api["members"] == [
        {"upstream": "tcp:10.0.0.1:80", "breaker": "closed", "healthy": True, "in_flight": 0,
         "attempts": 0, "failures": 0, "breaker_changed_at": None},
        {"upstream": "tcp:10.0.0.2:80", "breaker": "open", "healthy": True, "in_flight": 0,
         "attempts": 1, "failures": 1, "breaker_changed_at": 1_700_000_000.0},
    ]
    assert api["budget"] == {"retries": 0, "requests": 0, "allowed": 100}
    assert "traces" not in api


def test_status_shows_lazy_half_open() -> None:
    ambassador = FakeAmbassador()
    member = ambassador.routes["api"].core.members[0]
    member.breaker.acquire()
    member.breaker.failure()
    ambassador.clock.advance(10)
    api = json.loads(render(ambassador, "/status?route=api")[2])["routes"][0]
    assert api["members"][0]["breaker"] == "half-open"
    assert api["members"][0]["breaker_changed_at"] == 1_700_000_010.0


def test_status_of_one_route_adds_its_traces() -> None:
    ambassador = FakeAmbassador()
    ambassador.routes["cache"].core.traces.append("1 tcp:10.0.0.1:80 ok 1ms wait=0ms left=15000ms")
    document = json.loads(render(ambassador, "/status?route=cache")[2])
    [cache] = document["routes"]
    assert cache["name"] == "cache"
    assert cache["traces"] == ["1 tcp:10.0.0.1:80 ok 1ms wait=0ms left=15000ms"]


def test_unknown_route_and_path_are_404() -> None:
    ambassador = FakeAmbassador()
    assert render(ambassador, "/status?route=nope")[0] == 404
    assert render(ambassador, "/admin")[0] == 404


def test_only_get_and_head() -> None:
    assert render(FakeAmbassador(), "/ready", method=b"POST")[0] == 405


def test_metrics_content_type_and_body() -> None:
    code, headers, body = render(FakeAmbassador(), "/metrics")
    assert code == 200
    assert headers[b"Content-Type"][0].startswith(b"text/plain; version=0.0.4")
    assert b'ambassador_breaker_state{route="api",upstream="tcp:10.0.0.1:80"} 0.0' in body


def test_service_binds_in_privileged_start_and_stops_listening() -> None:
    reactor = MemoryReactor()
    service = AdminService("tcp:9901:interface=127.0.0.1", FakeAmbassador(), reactor)
    service.privilegedStartService()
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (9901, "127.0.0.1")
    assert factory is service.site
    service.startService()
    stopped: list[Any] = []
    service.stopService().addCallback(stopped.append)
    assert stopped == [None] and service.port is None


def test_service_refuses_a_port_it_cannot_bind() -> None:
    from twisted.internet.error import CannotListenError

    from ambassador.service import ListenFailed

    class Busy(MemoryReactor):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            raise CannotListenError(interface, port, OSError("Address already in use"))

    service = AdminService("tcp:9901:interface=127.0.0.1", FakeAmbassador(), Busy())
    with pytest.raises(ListenFailed, match="admin: cannot listen on tcp:9901"):
        service.privilegedStartService()


def test_the_process_serves_admin_next_to_a_route_named_admin_and_unreadies_on_stop() -> None:
    from ambassador.config import Config, DNSConfig
    from ambassador.protocols.tcp import tcpProtocol
    from ambassador.service import AmbassadorService

    route = Route(name="admin", protocol="tcp", listen="tcp:8080:interface=127.0.0.1",
                  upstreams=("tcp:127.0.0.1:9",))
    config = Config(source=None, admin="tcp:9901:interface=127.0.0.1", dns=DNSConfig(),
                    routes=(route,))
    class Reactor(MemoryReactor, Clock):
        def __init__(self) -> None:
            MemoryReactor.__init__(self)
            Clock.__init__(self)

    reactor = Reactor()
    ambassador = AmbassadorService(config, {"tcp": tcpProtocol}, reactor)
    ambassador.privilegedStartService()
    ambassador.startService()
    assert sorted(port for port, *_ in reactor.tcpServers) == [8080, 9901]
    assert ambassador.metrics in ambassador.observers
    assert ambassador.ready
    assert render(ambassador, "/ready")[0] == 200
    ambassador.stopService()
    assert not ambassador.ready
    assert render(ambassador, "/ready")[0] == 503
