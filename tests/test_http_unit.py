"""The http route's pieces without a network: header rules, options, and the app and
member protocols driven through StringTransports with a ``task.Clock`` for every timer."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface.verify import verifyObject

from ambassador.config import ConfigError, RetryPolicy, Route, loadConfig
from ambassador.interfaces import IRouteProtocol
from ambassador.protocols.http import httpProtocol
from ambassador.protocols.http.headers import (
    connectionTokens,
    errorResponse,
    memberHostHeader,
    parseRetryAfter,
)
from ambassador.resilience.core import RouteCore

# --- header rules ---------------------------------------------------------------------


@pytest.mark.parametrize("upstream, tls, host", [
    ("tcp:api.internal:80", False, b"api.internal"),
    ("tcp:api.internal:8080", False, b"api.internal:8080"),
    ("tcp:host=api.internal:port=8080", False, b"api.internal:8080"),
    ("tls:api.internal:443", False, b"api.internal"),
    ("tls:api.internal:8443", False, b"api.internal:8443"),
    ("tcp:api.internal:443", True, b"api.internal"),  # [route.tls] makes it a TLS member
    ("tcp:api.internal:443", False, b"api.internal:443"),
    ("unix:/run/app.sock", False, b"localhost"),
    ("unix:path=/run/app.sock", False, b"localhost"),
])
def test_member_host_header(upstream, tls, host):
    assert memberHostHeader(upstream, tls) == host


def test_retry_after_seconds_and_http_date():
    assert parseRetryAfter(b"7", 0.0) == 7.0
    assert parseRetryAfter(b"Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parseRetryAfter(b"soon", 0.0) is None


def test_connection_tokens():
    assert connectionTokens([b"keep-alive, X-Secret", b"Upgrade"]) == {b"keep-alive", b"x-secret", b"upgrade"}


def test_error_response_carries_reason_attempts_and_short_body():
    data = errorResponse("breaker-open", 0, close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"x-ambassador-error: breaker-open" in head and b"x-ambassador-attempts: 0" in head
    assert body == b"ambassador: breaker-open\n"
    assert errorResponse("deadline", 2, close=True).startswith(b"HTTP/1.1 504")


# --- the plugin and its options --------------------------------------------------------


def test_plugin_provides_the_interface():
    assert verifyObject(IRouteProtocol, httpProtocol)


def test_http_options_parsed_and_checked(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text("""
[[route]]
name = "api"
protocol = "http"
listen = "tcp:8080"
upstreams = ["tcp:127.0.0.1:9000"]
retry_on = ["reset", 503, "429"]
retry_methods = ["get", "POST"]
max_retry_body = "64KiB"
host_header = "api.example:8443"
trace = true
""")
    route = loadConfig(str(path)).routes[0]
    assert route.options["retry_on"] == ("reset", "503", "429")
    assert route.options["retry_methods"] == ("GET", "POST")
    assert route.options["max_retry_body"] == 65536
    assert route.options["host_header"] == "api.example:8443"
    assert route.options["trace"] is True
    path.write_text("""
[[route]]
name = "api"
protocol = "http"
listen = "tcp:8080"
upstreams = ["tcp:127.0.0.1:9000"]
retry_on = ["sometimes"]
max_retry_body = "lots"
""")
    with pytest.raises(ConfigError) as e:
        loadConfig(str(path))
    text = str(e.value)
    assert 'route "api"' in text and "retry_on" in text and "max_retry_body" in text


# --- protocols over StringTransports ------------------------------------------------------


class FakeMemberEndpoint:
    """A member endpoint whose connections are StringTransports the test can read."""

    def __init__(self) -> None:
        self.connections: list = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return succeed(protocol)


def _route(**overrides):
    options = {
        "retry_on": ("connect-failure", "tls-error", "reset", "timeout", "502", "503", "504"),
        "retry_methods": ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"),
        "host_header": None, "max_retry_body": 1024, "trace": False,
    }
    options.update(overrides.pop("options", {}))
    values = dict(
        name="api", protocol="http", listen="tcp:8080", upstreams=("tcp:10.0.0.1:8000",),
        timeout=2.0, deadline=5.0, headerTimeout=1.0, idleTimeout=30.0,
        retry=RetryPolicy(attempts=1), options=MappingProxyType(options),
    )
    values.update(overrides)
    return Route(**values)


def _app(route=None, observers=None):
    route = route or _route()
    clock = task.Clock()
    endpoint = FakeMemberEndpoint()
    core = RouteCore(route, clock, lambda upstream: endpoint, observers)
    factory = httpProtocol.buildFactory(route, core, clock)
    app = factory.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = app
    app.makeConnection(transport)
    return app, transport, endpoint, clock, core


def test_request_forwarded_and_member_connection_reused():
    app, transport, endpoint, clock, core = _app()
    app.dataReceived(b"GET /a?b=1 HTTP/1.1\r\nHost: app\r\nX-Id: 1\r\nConnection: keep-alive\r\n\r\n")
    member = endpoint.connections[0]
    sent = member.transport.value()
    assert sent.startswith(b"GET /a?b=1 HTTP/1.1\r\n")
    assert b"X-Id: 1\r\n" in sent and b"host: 10.0.0.1:8000\r\n" in sent
    assert b"Connection" not in sent
    member.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: y\r\n\r\nhi")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-ambassador-attempts: 1\r\n" in answer and answer.endswith(b"\r\n\r\nhi")
    transport.clear()
    member.transport.clear()
    app.dataReceived(b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n")
    assert len(endpoint.connections) == 1
    assert member.transport.value().startswith(b"GET /again ")


def test_attempt_timeout_closes_the_member_connection_and_answers_504():
    app, transport, endpoint, clock, core = _app()
    app.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    member = endpoint.connections[0]
    clock.advance(2.0)
    assert not member.transport.connected  # closed, never pooled
    assert transport.value().startswith(b"HTTP/1.1 504")
    assert b"x-ambassador-error: timeout" in transport.value()
    assert not app.pool.idle.get(core.members[0])


def test_slow_headers_get_408_and_no_member_is_touched():
    app, transport, endpoint, clock, core = _app()
    app.dataReceived(b"GET / HTTP/1.1\r\nHost: a")
    clock.advance(0.5)
    app.dataReceived(b"pp\r\n")
    clock.advance(0.6)
    assert transport.value().startswith(b"HTTP/1.1 408")
    assert not transport.connected
    assert endpoint.connections == []


def test_idle_connection_closed_without_answer():
    app, transport, endpoint, clock, core = _app()
    clock.advance(29)
    assert transport.connected
    clock.advance(1.5)
    assert not transport.connected and transport.value() == b""


def test_retryable_status_held_then_dropped_for_the_retry():
    route = _route(retry=RetryPolicy(attempts=2, backoffBase=0.01, backoffMax=0.01))
    app, transport, endpoint, clock, core = _app(route)
    app.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    first = endpoint.connections[0]
    first.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    assert transport.value() == b""
    clock.advance(0.02)
    # the 503's connection went back to the pool, and the retry reused it
    assert len(endpoint.connections) == 1
    first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert b"x-ambassador-attempts: 2" in transport.value()


def test_garbage_from_member_is_protocol_error():
    app, transport, endpoint, clock, core = _app()
    app.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    endpoint.connections[0].dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 502")
    assert b"x-ambassador-error: protocol-error" in transport.value()


def test_overloaded_connection_gets_503():
    route = _route(maxConnections=1)
    app, transport, endpoint, clock, core = _app(route)
    second = app.factory.buildProtocol(None)
    other = StringTransportWithDisconnection()
    other.protocol = second
    second.makeConnection(other)
    second.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    assert other.value().startswith(b"HTTP/1.1 503")
    assert b"x-ambassador-error: overloaded" in other.value()
    assert endpoint.connections == []


def test_an_excess_connection_that_sends_nothing_is_closed_after_header_timeout():
    """Over max_connections, a silent connection does not hold its descriptor for
    idle_timeout: it is closed once header_timeout passed with no request."""
    route = _route(maxConnections=1)
    app, transport, endpoint, clock, core = _app(route)
    second = app.factory.buildProtocol(None)
    other = StringTransportWithDisconnection()
    other.protocol = second
    second.makeConnection(other)
    other.abortConnection = other.loseConnection  # type: ignore[method-assign]
    clock.advance(route.headerTimeout - 0.01)
    assert other.connected
    clock.advance(0.02)
    assert not other.connected
    assert transport.connected  # the admitted one is left alone
    assert endpoint.connections == []


def test_a_big_head_in_several_reads_is_fine_under_64k_and_431_over():
    app, transport, endpoint, clock, core = _app()
    header = b"X-A: " + b"a" * 20000 + b"\r\n"
    app.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\n" + header)
    app.dataReceived(header)
    app.dataReceived(header + b"\r\n")
    assert transport.value() == b"" and len(endpoint.connections) == 1
    app2, transport2, endpoint2, _, _ = _app()
    app2.dataReceived(b"GET / HTTP/1.1\r\nHost: app\r\nX-B: ")
    for _ in range(5):
        app2.dataReceived(b"b" * 20000)  # one endless header line
    assert transport2.value().startswith(b"HTTP/1.1 431")
    assert endpoint2.connections == []


class Records:
    """An IRouteObserver that keeps the finished requests."""

    def __init__(self):
        self.records = []

    def requestFinished(self, route, record):
        self.records.append(record)

    def __getattr__(self, name):
        return lambda *args: None


def test_bytes_in_and_out_are_the_bytes_on_the_wire():
    observer = Records()
    app, transport, endpoint, clock, core = _app(observers=[observer])
    first = b"POST /a?b=1 HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
    second = b"GET /longer/path HTTP/1.1\r\nHost:   app  \r\n\r\n"
    app.dataReceived(first[:20])
    app.dataReceived(first[20:-2])
    app.dataReceived(first[-2:] + second)  # the second request pipelined
    member = endpoint.connections[0]
    member.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    member.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [r.bytesIn for r in observer.records] == [len(first), len(second)]
    assert sum(r.bytesOut for r in observer.records) == len(transport.value())
