"""The line route's app and member connections, on a ``task.Clock`` with
``StringTransport``s: replay on reset, cancellation on timeout, ordering, config."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from ambassador.config import ConfigError, RetryPolicy, Route, loadConfig
from ambassador.interfaces import IRouteProtocol
from ambassador.protocols.line import LineRun
from ambassador.protocols.line.protocol import LineFactory, lineProtocol
from ambassador.protocols.line.redis import encode, redisDialect
from ambassador.resilience.core import RouteCore


class FakeEndpoint:
    """Connects at once to a StringTransport; remembers every protocol it made."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


class Records:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def requestFinished(self, route: str, record: Any) -> None:
        self.records.append(record)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def _route(**kw: Any) -> Route:
    values: dict[str, Any] = dict(
        name="cache", protocol="line", listen="tcp:1", upstreams=("tcp:127.0.0.1:9",),
        timeout=1.0, deadline=10.0, retry=RetryPolicy(attempts=3, backoffBase=0.1, backoffMax=0.1),
        options={"dialect": "redis"},
    )
    values.update(kw)
    return Route(**values)


def _setUp(**kw: Any):  # type: ignore[no-untyped-def]
    clock = Clock()
    endpoint = FakeEndpoint()
    records = Records()
    core = RouteCore(_route(**kw), clock, lambda upstream: endpoint, [records], random=lambda: 1.0)
    factory = LineFactory(core.route, core, clock, redisDialect)
    app = factory.buildProtocol(None)
    appTransport = StringTransport()
    app.makeConnection(appTransport)
    return clock, endpoint, app, appTransport, records


def test_connection_lost_replays_reads_and_fails_writes_with_reset() -> None:
    clock, endpoint, app, appTransport, records = _setUp()
    app.dataReceived(encode([b"GET", b"a"]) + encode([b"SET", b"b", b"v"]))
    first = endpoint.protocols[0]
    assert first.transport.value() == encode([b"GET", b"a"]) + encode([b"SET", b"b", b"v"])
    first.connectionLost(Failure(ierror.ConnectionLost()))
    assert appTransport.value() == b""  # the GET answers first, and it is being retried
    clock.advance(0.1)
    second = endpoint.protocols[1]
    assert second.transport.value() == encode([b"GET", b"a"])  # the SET is not replayed
    second.dataReceived(b"$1\r\nA\r\n")
    assert appTransport.value() == b"$1\r\nA\r\n-ERR ambassador reset\r\n"
    assert [(r.result, r.attempts) for r in records.records] == [("ok", 2), ("reset", 1)]


def test_timed_out_attempt_closes_its_connection_and_its_late_reply_is_discarded() -> None:
    clock, endpoint, app, appTransport, _ = _setUp()
    app.dataReceived(encode([b"GET", b"slow"]))
    first = endpoint.protocols[0]
    clock.advance(1.0)  # the attempt's timeout
    assert first.transport.disconnecting
    clock.advance(0.1)  # backoff, then the retry on a new connection
    second = endpoint.protocols[1]
    assert second.transport.value() == encode([b"GET", b"slow"])
    first.dataReceived(b"$4\r\nLATE\r\n")
    second.dataReceived(b"$4\r\nGOOD\r\n")
    assert appTransport.value() == b"$4\r\nGOOD\r\n"


def test_answers_in_request_order_whatever_order_members_answer() -> None:
    _clock, endpoint, app, appTransport, _ = _setUp(
        upstreams=("tcp:127.0.0.1:1", "tcp:127.0.0.1:2"),
    )
    app.dataReceived(encode([b"GET", b"x"]) + encode([b"GET", b"y"]))
    one, two = endpoint.protocols
    two.dataReceived(b"$1\r\nY\r\n")
    assert appTransport.value() == b""
    one.dataReceived(b"$1\r\nX\r\n")
    assert appTransport.value() == b"$1\r\nX\r\n$1\r\nY\r\n"


def test_one_app_connection_sticks_to_one_member_connection_in_order() -> None:
    _clock, endpoint, app, _appTransport, _ = _setUp()
    app.dataReceived(encode([b"SET", b"k", b"v"]))
    app.dataReceived(encode([b"GET", b"k"]))
    (only,) = endpoint.protocols
    assert only.transport.value() == encode([b"SET", b"k", b"v"]) + encode([b"GET", b"k"])


def test_line_protocol_plugin_and_config() -> None:
    assert verifyObject(IRouteProtocol, lineProtocol)
    config = loadConfig(None, ["line:redis tcp:6380 tcp:127.0.0.1:6379"])
    (route,) = config.routes
    assert (route.protocol, route.options["dialect"]) == ("line", "redis")
    with pytest.raises(ConfigError, match="unknown dialect 'nope'"):
        loadConfig(None, ["line:nope tcp:6380 tcp:127.0.0.1:6379"])


def test_idempotent_only_for_the_generic_dialect(tmp_path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[[route]]\nname = "c"\nprotocol = "line"\ndialect = "redis"\nidempotent = true\n'
        'listen = "tcp:6380"\nupstreams = ["tcp:127.0.0.1:6379"]\n'
    )
    with pytest.raises(ConfigError, match='route "c": key "idempotent"'):
        loadConfig(str(path))


def test_coalesced_writes_go_out_once_per_reactor_iteration() -> None:
    """With ``coalesce`` (what the plugin builds), the requests of several app
    connections read in one reactor iteration share one write to their member
    connection, made when the iteration's calls run (``callLater(0)``)."""
    clock = Clock()
    endpoint = FakeEndpoint()
    route = _route()
    core = RouteCore(route, clock, lambda upstream: endpoint, [Records()], random=lambda: 1.0)
    factory = LineFactory(route, core, clock, redisDialect, coalesce=True)
    factory.pool.size = 1
    apps = []
    for _ in range(3):
        app = factory.buildProtocol(None)
        app.makeConnection(StringTransport())
        apps.append(app)
    for i, app in enumerate(apps):
        app.dataReceived(encode([b"GET", b"k%d" % i]))
    (member,) = endpoint.protocols
    writes: list[bytes] = []
    member.transport.write = writes.append  # type: ignore[method-assign]
    member.write = writes.append
    assert writes == []  # nothing yet: the iteration is still handing out input
    clock.advance(0)
    assert writes == [b"".join(encode([b"GET", b"k%d" % i]) for i in range(3))]
    member.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
    assert [app.transport.value() for app in apps] == [b""] * 3  # answers wait too
    clock.advance(0)
    assert [app.transport.value() for app in apps] == [b"$1\r\na\r\n", b"$1\r\nb\r\n", b"$1\r\nc\r\n"]


# --- pipelined bursts (access log off): one attempt for a run of requests -------------


def _expand(records: Records) -> list[tuple[str, int]]:
    """(result, attempts) per request: a burst's record stands for ``count`` of them."""
    return [(r.result, r.attempts) for r in records.records for _ in range(r.count)]


def test_a_pipelined_burst_goes_out_as_one_write_and_comes_back_as_one() -> None:
    clock, endpoint, app, appTransport, records = _setUp(accessLog=False)
    requests = [encode([b"SET", b"k", b"v"]), encode([b"GET", b"k"]), encode([b"INCR", b"n"])]
    for turn in range(2):
        app.dataReceived(b"".join(requests))
        (member,) = endpoint.protocols
        assert member.transport.value() == b"".join(requests) * (turn + 1)
        assert app.unanswered == 3
        if turn == 1:
            # the redis parser knows these commands by now: it frames them as one run
            (burst,) = app.queue
            assert burst.count == 3 and type(burst.request) is LineRun
        member.dataReceived(b"+OK\r\n$1\r\n")  # replies split anywhere
        assert appTransport.value() == b"+OK\r\n$1\r\nv\r\n:7\r\n" * turn
        member.dataReceived(b"v\r\n:7\r\n")
        assert appTransport.value() == b"+OK\r\n$1\r\nv\r\n:7\r\n" * (turn + 1)
    assert _expand(records) == [("ok", 1)] * 6
    assert app.core.budget.requests == 6  # each request counts for the retry budget
    assert app.unanswered == 0 and not app.queue


def test_the_route_makes_bursts_of_a_dialect_s_single_requests() -> None:
    """A dialect whose parser hands out single requests (memcached) still has its
    pipelined requests sent and answered as one burst."""
    from ambassador.protocols.line.memcached import memcachedDialect

    clock = Clock()
    endpoint = FakeEndpoint()
    records = Records()
    route = _route(accessLog=False, options={"dialect": "memcached"})
    core = RouteCore(route, clock, lambda upstream: endpoint, [records], random=lambda: 1.0)
    factory = LineFactory(route, core, clock, memcachedDialect)
    app = factory.buildProtocol(None)
    appTransport = StringTransport()
    app.makeConnection(appTransport)
    app.dataReceived(b"get a b\r\nset c 0 0 1\r\nx\r\nincr n 1\r\n")
    (burst,) = app.queue
    assert burst.count == 3
    (member,) = endpoint.protocols
    member.dataReceived(b"VALUE a 0 1\r\nA\r\nEND\r\nSTO")
    assert appTransport.value() == b""
    member.dataReceived(b"RED\r\n5\r\n")
    assert appTransport.value() == b"VALUE a 0 1\r\nA\r\nEND\r\nSTORED\r\n5\r\n"
    assert _expand(records) == [("ok", 1)] * 3


def test_a_burst_cut_by_a_reset_keeps_its_answers_and_retries_each_request_alone() -> None:
    """Two of five replies came before the connection was lost: they stand; of the
    other three, the reads are replayed on a new connection and the write is answered
    with ``reset`` (written, unsafe), all in request order."""
    clock, endpoint, app, appTransport, records = _setUp(accessLog=False)
    app.dataReceived(b"".join([
        encode([b"GET", b"a"]), encode([b"SET", b"b", b"1"]),
        encode([b"GET", b"c"]), encode([b"INCR", b"d"]), encode([b"GET", b"e"]),
    ]))
    first = endpoint.protocols[0]
    first.dataReceived(b"$1\r\nA\r\n+OK\r\n")
    assert appTransport.value() == b""  # a burst answers as a whole
    first.connectionLost(Failure(ierror.ConnectionLost()))
    assert appTransport.value() == b"$1\r\nA\r\n+OK\r\n"  # the answered part at once
    clock.advance(0.1)  # the backoff
    second = endpoint.protocols[1]
    assert second.transport.value() == encode([b"GET", b"c"]) + encode([b"GET", b"e"])
    second.dataReceived(b"$1\r\nC\r\n$1\r\nE\r\n")
    assert appTransport.value() == (
        b"$1\r\nA\r\n+OK\r\n$1\r\nC\r\n-ERR ambassador reset\r\n$1\r\nE\r\n")
    assert _expand(records) == [("ok", 1), ("ok", 1), ("ok", 2), ("reset", 1), ("ok", 2)]
    assert app.unanswered == 0 and not app.queue


def test_a_burst_that_could_not_be_written_is_replayed_whole_request_by_request() -> None:
    clock = Clock()
    refused: list[Any] = []

    class Refusing(FakeEndpoint):
        def connect(self, factory: Any) -> Any:
            if not refused:
                refused.append(True)
                from twisted.internet.defer import fail
                return fail(ierror.ConnectionRefusedError())
            return super().connect(factory)

    endpoint = Refusing()
    records = Records()
    core = RouteCore(_route(accessLog=False), clock, lambda upstream: endpoint, [records],
                     random=lambda: 1.0)
    factory = LineFactory(core.route, core, clock, redisDialect)
    app = factory.buildProtocol(None)
    appTransport = StringTransport()
    app.makeConnection(appTransport)
    app.dataReceived(encode([b"SET", b"x", b"1"]) + encode([b"INCR", b"y"]))
    clock.advance(0.1)
    (member,) = endpoint.protocols
    # never written: even the writes are replayed (SPEC §4/line)
    assert member.transport.value() == encode([b"SET", b"x", b"1"]) + encode([b"INCR", b"y"])
    member.dataReceived(b"+OK\r\n:1\r\n")
    assert appTransport.value() == b"+OK\r\n:1\r\n"
    assert _expand(records) == [("ok", 2), ("ok", 2)]


def test_a_burst_that_times_out_fails_its_writes_and_retries_its_reads() -> None:
    clock, endpoint, app, appTransport, records = _setUp(accessLog=False)
    app.dataReceived(encode([b"GET", b"a"]) + encode([b"DEL", b"b"]))
    first = endpoint.protocols[0]
    clock.advance(1.0)  # the route's timeout: the attempt is abandoned, its connection closed
    assert first.transport.disconnecting
    clock.advance(0.1)
    second = endpoint.protocols[1]
    assert second.transport.value() == encode([b"GET", b"a"])
    second.dataReceived(b"$1\r\nA\r\n")
    assert appTransport.value() == b"$1\r\nA\r\n-ERR ambassador timeout\r\n"
    assert _expand(records) == [("ok", 2), ("timeout", 1)]


def test_a_burst_with_no_usable_member_answers_each_request_with_the_error() -> None:
    clock, endpoint, app, appTransport, records = _setUp(accessLog=False)
    member = app.core.members[0]
    for _ in range(10):
        member.breaker.failure()
    assert not member.usable
    app.dataReceived(encode([b"GET", b"a"]) * 3)
    assert endpoint.protocols == []  # not touched
    assert appTransport.value() == b"-ERR ambassador breaker-open\r\n" * 3
    assert _expand(records) == [("breaker-open", 0)] * 3


def test_bursts_only_with_the_access_log_off() -> None:
    _clock, endpoint, app, _appTransport, _records = _setUp()
    app.dataReceived(encode([b"GET", b"a"]) * 3)
    assert len(app.queue) == 3  # one entry per request: each its own log line


def test_under_hash_routing_a_burst_holds_only_keys_of_one_owner() -> None:
    """Consecutive requests whose keys the ring gives to one member go as one burst;
    a key of another member starts another; keyless and split requests go alone.
    Each member gets exactly its keys, and the app its answers in order."""
    clock, endpoint, app, appTransport, records = _setUp(
        accessLog=False, balance="hash", upstreams=("tcp:127.0.0.1:1", "tcp:127.0.0.1:2"))
    core = app.core
    owner = lambda key: core.balancer.pick(core.candidates(), (), key)  # noqa: E731
    keys = [b"k%d" % i for i in range(40)]
    first = owner(keys[0])
    same = [k for k in keys if owner(k) is first][:3]
    other = [k for k in keys if owner(k) is not first][:2]
    assert len(same) == 3 and len(other) == 2
    order = [same[0], same[1], other[0], other[1], same[2]]
    app.dataReceived(b"".join(encode([b"GET", k]) for k in order) + encode([b"PING"]))
    assert [c.count for c in app.queue] == [2, 2, 1, 1]
    byMember: dict[Any, bytes] = {}
    for protocol in endpoint.protocols:
        byMember.setdefault(protocol.member, b"")
        byMember[protocol.member] += protocol.transport.value()
    second = owner(other[0])
    assert byMember[first].startswith(encode([b"GET", same[0]]) + encode([b"GET", same[1]]))
    assert encode([b"GET", same[2]]) in byMember[first]
    assert encode([b"GET", other[0]]) + encode([b"GET", other[1]]) in byMember[second]
    for protocol in endpoint.protocols:  # answer each request, in write order, with its key
        sent = protocol.transport.value()
        out = b""
        pos = 0
        while pos < len(sent):
            for k in keys + [None]:
                request = encode([b"PING"]) if k is None else encode([b"GET", k])
                if sent.startswith(request, pos):
                    out += b"+PONG\r\n" if k is None else b"$%d\r\n%s\r\n" % (len(k), k)
                    pos += len(request)
                    break
            else:
                raise AssertionError(sent[pos:])
        protocol.dataReceived(out)
    assert appTransport.value() == b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in order) + b"+PONG\r\n"
    assert _expand(records) == [("ok", 1)] * 6
