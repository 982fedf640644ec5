"""Active health checks on a Clock and StringTransports (SPEC §2 [route.health], §3)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ambassador.config import HealthPolicy, Route
from ambassador.health import HealthChecks
from ambassador.resilience.core import RouteCore


class ScriptedEndpoint:
    """Connects at once to a StringTransport and answers what ``reply`` says; or never
    connects (``hang``), or refuses."""

    def __init__(self, reply: bytes | None = b"", refuse: bool = False, hang: bool = False) -> None:
        self.reply = reply
        self.refuse = refuse
        self.hang = hang
        self.sent: list[bytes] = []
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.hang:
            return Deferred()
        if self.refuse:
            from twisted.internet.error import ConnectionRefusedError
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError())
            return d
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.transports.append(transport)
        protocol.makeConnection(transport)
        self.sent.append(transport.value())
        if self.reply:
            protocol.dataReceived(self.reply)
        return succeed(protocol)


def checked(protocol: str, endpoints: list[ScriptedEndpoint], options: dict[str, Any] | None = None,
            **policy: Any) -> tuple[RouteCore, HealthChecks, Clock]:
    from types import MappingProxyType

    clock = Clock()
    upstreams = tuple(f"tcp:127.0.0.1:{7000 + i}" for i in range(len(endpoints)))
    route = Route(name="r", protocol=protocol, listen="tcp:1", upstreams=upstreams,
                  health=HealthPolicy(interval=5, timeout=1, **policy),
                  options=MappingProxyType(options or {}))
    byUpstream = dict(zip(upstreams, endpoints))
    core = RouteCore(route, clock, lambda upstream: byUpstream[upstream])
    checks = HealthChecks(core, route, clock)
    checks.startService()
    return core, checks, clock


def test_http_member_answering_500_turns_unhealthy_after_the_threshold_and_back():
    bad = ScriptedEndpoint(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
    good = ScriptedEndpoint(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    core, _checks, clock = checked("http", [bad, good], unhealthyThreshold=2, healthyThreshold=2)
    badMember, goodMember = core.members
    assert badMember.healthy  # one failure is not enough
    assert bad.sent[0].startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:7000\r\n")
    clock.advance(5)
    assert not badMember.healthy and goodMember.healthy
    assert not badMember.usable
    picks = {core.balancer.pick(core.candidates(), [], None) for _ in range(10)}
    assert picks == {goodMember}  # skipped before any user request meets it
    bad.reply = b"HTTP/1.1 200 OK\r\n\r\n"
    clock.advance(5)
    assert not badMember.healthy
    clock.advance(5)
    assert badMember.healthy
    assert badMember.breaker.state == "closed"  # the breaker is live traffic's


def test_http_path_and_expected_status_come_from_the_policy():
    endpoint = ScriptedEndpoint(b"HTTP/1.1 204 No Content\r\n\r\n")
    core, _checks, clock = checked("http", [endpoint], path="/ping", expectStatus=204,
                                  unhealthyThreshold=1)
    assert endpoint.sent[0].startswith(b"GET /ping HTTP/1.1\r\n")
    clock.advance(5)
    assert core.members[0].healthy


def test_a_check_that_gets_no_answer_within_timeout_fails():
    endpoint = ScriptedEndpoint(hang=True)
    core, checks, clock = checked("tcp", [endpoint], unhealthyThreshold=1)
    assert core.members[0].healthy
    clock.advance(1)
    assert not core.members[0].healthy
    assert checks.checking == {}


def test_tcp_check_is_a_connection():
    endpoint = ScriptedEndpoint()
    core, _checks, clock = checked("tcp", [endpoint], unhealthyThreshold=1, healthyThreshold=1)
    assert endpoint.sent == [b""] and endpoint.transports[0].disconnecting
    assert core.members[0].healthy
    endpoint.refuse = True
    clock.advance(5)
    assert not core.members[0].healthy
    endpoint.refuse = False
    clock.advance(5)
    assert core.members[0].healthy


def test_redis_ping_and_memcached_version():
    redis = ScriptedEndpoint(b"-ERR loading\r\n")
    core, _, _ = checked("line", [redis], {"dialect": "redis"}, unhealthyThreshold=1)
    assert redis.sent[0] == b"*1\r\n$4\r\nPING\r\n"
    assert not core.members[0].healthy
    memcached = ScriptedEndpoint(b"VERSION 1.6.21\r\n")
    core, _, _clock = checked("line", [memcached], {"dialect": "memcached"}, unhealthyThreshold=1)
    assert memcached.sent[0] == b"version\r\n"
    assert core.members[0].healthy


def test_stop_ends_the_loop_and_the_checks_under_way():
    endpoint = ScriptedEndpoint(hang=True)
    core, checks, clock = checked("tcp", [endpoint])
    checks.stopService()
    assert clock.getDelayedCalls() == []
    assert core.members[0].healthy


def test_a_retired_member_is_forgotten():
    endpoint = ScriptedEndpoint(b"HTTP/1.1 500 x\r\n\r\n")
    core, checks, clock = checked("http", [endpoint])
    member = core.members[0]
    core.members.remove(member)
    member.retired = True
    clock.advance(5)
    assert member not in checks.streaks and member.healthy


def test_a_discovered_member_is_checked_with_its_dns_name_as_host():
    endpoint = ScriptedEndpoint(b"HTTP/1.1 200 OK\r\n\r\n")
    core, checks, _ = checked("http", [endpoint])
    core.members[0].hostName = "svc.test"
    core.members[0].upstream = "tcp:10.0.0.1:80"
    endpoint.sent.clear()
    checks.check(core.members[0])
    assert endpoint.sent[0].startswith(b"GET /health HTTP/1.1\r\nHost: svc.test\r\n")
