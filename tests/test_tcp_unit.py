"""The tcp route (SPEC §4/tcp) in memory: a ``MemoryReactorClock`` records member
connection attempts, ``StringTransport``s stand for both sockets, and every timer
runs on the fake clock.
"""

from __future__ import annotations

from typing import Any

from test_core import Recorder
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import clientFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from ambassador.config import BreakerPolicy, RetryPolicy, Route
from ambassador.interfaces import IRouteProtocol
from ambassador.protocols.tcp import tcpProtocol
from ambassador.resilience.core import RouteCore

UPSTREAMS = ("tcp:127.0.0.1:9001", "tcp:127.0.0.1:9002")


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records half-closes (ITCPTransport.loseWriteConnection)."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Pair:
    """One tcp route in memory, with helpers to play the app and the members."""

    def __init__(self, **routeOptions: Any) -> None:
        options = {
            "connectTimeout": 2.0, "deadline": 15.0, "idleTimeout": 80.0, "maxConnections": 2,
            "retry": RetryPolicy(3, 0.05, 2.0, 0.2, 10.0), "breaker": BreakerPolicy(5, 10.0, 1),
        }
        options.update(routeOptions)
        self.route = Route(
            name="db", protocol="tcp", listen="tcp:5433:interface=127.0.0.1",
            upstreams=UPSTREAMS, **options,
        )
        self.reactor = MemoryReactorClock()
        self.recorder = Recorder()
        self.core = RouteCore(
            self.route, self.reactor, lambda u: clientFromString(self.reactor, u),
            [self.recorder], random=lambda: 0.0,
        )
        self.factory = tcpProtocol.buildFactory(self.route, self.core, self.reactor)

    def appConnects(self) -> tuple[Any, HalfCloseTransport]:
        app = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = HalfCloseTransport()
        app.makeConnection(transport)
        return app, transport

    def memberAccepts(self, index: int = -1) -> tuple[Any, HalfCloseTransport]:
        """The member of connection attempt ``index`` accepts it."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = HalfCloseTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def memberRefuses(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ierror.ConnectionRefusedError()))

    def attemptedPorts(self) -> list[int]:
        return [port for _, port, *_ in self.reactor.tcpClients]

    def records(self) -> list[Any]:
        return [e[2] for e in self.recorder.of("request")]


def test_tcp_plugin_provides_the_interface():
    assert verifyObject(IRouteProtocol, tcpProtocol)
    assert tcpProtocol.name == "tcp" and tcpProtocol.keyHashing is False


def test_the_app_connection_is_paused_until_a_member_connects():
    pair = Pair()
    _app, appTransport = pair.appConnects()
    assert appTransport.producerState == "paused"
    assert pair.attemptedPorts() == [9001]
    _member, memberTransport = pair.memberAccepts()
    assert appTransport.producerState == "producing"
    # back-pressure both ways: each transport is the other's streaming producer
    assert appTransport.producer is memberTransport and appTransport.streaming
    assert memberTransport.producer is appTransport and memberTransport.streaming


def test_bytes_flow_both_ways_and_the_connection_is_one_ok_request():
    pair = Pair()
    app, appTransport = pair.appConnects()
    member, memberTransport = pair.memberAccepts()
    app.dataReceived(b"SELECT 1;")
    assert memberTransport.value() == b"SELECT 1;"
    member.dataReceived(b"1 row")
    assert appTransport.value() == b"1 row"
    pair.reactor.advance(3)
    app.connectionLost(Failure(ierror.ConnectionDone()))
    assert memberTransport.disconnecting
    (record,) = pair.records()
    assert (record.upstream, record.attempts, record.result) == (UPSTREAMS[0], 1, "ok")
    assert (record.bytesIn, record.bytesOut, record.duration) == (9, 5, 3.0)
    assert pair.core.activeConnections == 0


def test_a_refused_member_is_retried_on_the_other_one():
    pair = Pair()
    app, appTransport = pair.appConnects()
    pair.memberRefuses()
    assert pair.attemptedPorts() == [9001, 9002]
    assert appTransport.producerState == "paused"
    pair.memberAccepts()
    assert appTransport.producerState == "producing"
    app.connectionLost(Failure(ierror.ConnectionDone()))
    (record,) = pair.records()
    assert (record.upstream, record.attempts, record.result) == (UPSTREAMS[1], 2, "ok")


def test_connect_timeout_bounds_each_connection_attempt():
    pair = Pair(connectTimeout=2.0)
    _app, _appTransport = pair.appConnects()
    pair.reactor.advance(1.9)
    assert pair.attemptedPorts() == [9001]
    pair.reactor.advance(0.1)
    assert pair.reactor.connectors[0].stoppedConnecting  # the attempt was abandoned
    assert pair.attemptedPorts() == [9001, 9002]
    assert [e[3] for e in pair.recorder.of("attempt")] == ["connect-failure"]


def test_no_member_within_the_deadline_closes_the_app_connection():
    pair = Pair(connectTimeout=2.0, deadline=3.0)
    app, appTransport = pair.appConnects()
    pair.reactor.advance(2.0)  # try 1: connect timeout; try 2 starts with 1 s left
    pair.reactor.advance(1.0)
    assert pair.reactor.connectors[1].stoppedConnecting
    assert appTransport.disconnecting
    app.connectionLost(Failure(ierror.ConnectionDone()))
    (record,) = pair.records()
    assert (record.result, record.attempts, record.upstream) == ("deadline", 2, UPSTREAMS[1])
    assert pair.reactor.getDelayedCalls() == []


def test_every_member_refusing_closes_the_app_connection_with_the_reason():
    pair = Pair(retry=RetryPolicy(2, 0.05, 2.0, 0.2, 10.0))
    app, appTransport = pair.appConnects()
    pair.memberRefuses()
    pair.memberRefuses()
    assert appTransport.disconnecting
    app.connectionLost(Failure(ierror.ConnectionDone()))
    (record,) = pair.records()
    assert (record.result, record.attempts) == ("connect-failure", 2)


def test_over_max_connections_the_app_connection_is_aborted_and_counted_overloaded():
    pair = Pair(maxConnections=1)
    _first, _ = pair.appConnects()
    second, secondTransport = pair.appConnects()
    assert secondTransport.disconnected  # aborted: StringTransport's abortConnection mark
    assert pair.attemptedPorts() == [9001]  # the second one never reached a member
    second.connectionLost(Failure(ierror.ConnectionAborted()))
    (record,) = pair.records()
    assert (record.result, record.attempts, record.upstream) == ("overloaded", 0, None)
    assert pair.core.activeConnections == 1
    assert [e[2] for e in pair.recorder.of("connections")] == [1]


def test_the_app_leaving_while_connecting_abandons_the_attempt():
    pair = Pair()
    app, _appTransport = pair.appConnects()
    app.connectionLost(Failure(ierror.ConnectionLost()))
    assert pair.reactor.connectors[0].stoppedConnecting
    assert pair.reactor.getDelayedCalls() == []
    assert pair.core.members[0].inFlight == 0
    assert pair.core.activeConnections == 0
    (record,) = pair.records()
    assert (record.result, record.upstream) == ("client-closed", None)  # never "ok" without a member


def test_half_close_is_passed_on_both_ways():
    pair = Pair()
    app, appTransport = pair.appConnects()
    member, memberTransport = pair.memberAccepts()
    app.readConnectionLost()
    assert memberTransport.writeClosed and not memberTransport.disconnecting
    member.dataReceived(b"last words")
    assert appTransport.value() == b"last words"
    member.readConnectionLost()
    assert appTransport.writeClosed
    assert appTransport.disconnecting and memberTransport.disconnecting


def test_an_idle_pair_is_closed_after_idle_timeout_and_activity_postpones_it():
    pair = Pair(idleTimeout=80.0)
    app, appTransport = pair.appConnects()
    _member, memberTransport = pair.memberAccepts()
    # second by second, as a real reactor runs the periodic check (Clock.advance(n)
    # would run it once for the whole n seconds)
    pair.reactor.pump([1.0] * 40)
    app.dataReceived(b"ping")
    pair.reactor.pump([1.0] * 79)  # 119 s: 79 s after the last byte
    assert not appTransport.disconnecting
    pair.reactor.pump([1.0] * 11)  # past 120 s + one check interval (80 s / 8)
    assert appTransport.disconnected and memberTransport.disconnected


def test_a_member_reset_aborts_the_app_connection():
    pair = Pair()
    _app, appTransport = pair.appConnects()
    member, _memberTransport = pair.memberAccepts()
    member.connectionLost(Failure(ierror.ConnectionLost()))
    assert appTransport.disconnected
