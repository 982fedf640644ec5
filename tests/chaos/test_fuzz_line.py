"""The line dialects' parsers under garbage, and a real twistd line route fed garbage
(issue 9; SPEC §4/line: "A malformed request gets the error reply with reason
``protocol-error``, then the connection closes").

``tests/test_line_parsers.py`` already checks that any split of a *valid* stream frames
the same and that uniformly random bytes do not crash a request parser.  Random bytes
rarely get past the first byte of a RESP or memcached parser, so the garbage here is
built from the dialects' own tokens (``*``, ``$``, lengths, huge and negative numbers,
command names, line ends), which reaches every branch: lengths of thousands of digits,
negative bulk lengths, storage commands with out-of-range fields, ...

Properties:

- a request or reply parser raises nothing but the dialect's ``ProtocolError`` (reply
  parsers) or answers it with a ``protocol-error`` request (request parsers), however
  the bytes are split, and frames the same whatever the split;
- it never returns an empty reply (a caller looping on ``next`` would spin) and never
  takes more bytes than it was given; every call returns within a bound (SIGALRM);
- the real twistd answers a garbage stream with exactly one reply per request its
  dialect framed, in order (the member's, or the ambassador's error reply), closes
  after ``protocol-error``, and keeps serving with the same pid.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ambassador.config import Route
from ambassador.protocols.line import LineRequest, ProtocolError
from ambassador.protocols.line.memcached import LINE, STATS, VALUES, memcachedDialect
from ambassador.protocols.line.plain import plainDialect
from ambassador.protocols.line.redis import _Incomplete, encode, redisDialect, replyEnd
from ambassador.protocols.line.pool import POOL_SIZE

ROUTE = Route(name="r", protocol="line", listen="tcp:1", upstreams=("tcp:h:1",))
HASHED = Route(name="r", protocol="line", listen="tcp:1", upstreams=("tcp:h:1",), balance="hash")

#: A parser call that takes longer than this is taken for an endless loop.
CALL_BOUND = 5


@contextlib.contextmanager
def bounded(seconds: int = CALL_BOUND) -> Iterator[None]:
    """Fail (instead of hanging CI) when the block runs longer than ``seconds``."""

    def expired(signum, frame):  # type: ignore[no-untyped-def]
        raise AssertionError(f"a parser call ran over {seconds}s: an endless loop?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def frameRequests(parser, pieces: list[bytes]) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Feed the pieces; the framed requests as comparable tuples.  Checks on the way
    that nothing follows a closing request and that no request is made of more bytes
    than were fed."""
    out: list[LineRequest] = []
    closed = False
    fed = 0
    with bounded():
        for piece in pieces:
            fed += len(piece)
            got = parser.feed(piece)
            assert isinstance(got, list)
            for request in got:
                assert isinstance(request, LineRequest)
                assert not closed, "a request framed after one that closes the connection"
                closed = closed or request.close
            out.extend(got)
    assert sum(len(r.raw) for r in out if r.error is None and r.localReply is None) <= fed * 2 + 16
    return [(r.raw, r.key, r.safe, r.kind, r.expectsReply, r.error, r.close, r.localReply) for r in out]


def frameReplies(parser, pieces: list[bytes], kinds: list) -> tuple[list[bytes], bool]:  # type: ignore[no-untyped-def]
    """Feed the pieces, taking replies of ``kinds`` in turn: (replies, raised ProtocolError)."""
    replies: list[bytes] = []
    kinds = list(kinds)
    fed = b""
    with bounded():
        try:
            for piece in pieces:
                parser.feed(piece)
                fed += piece
                while kinds:
                    reply = parser.next(kinds[0])
                    if reply is None:
                        break
                    assert reply, "an empty reply: a caller looping on next() would spin"
                    replies.append(reply)
                    kinds.pop(0)
        except ProtocolError:
            return replies, True
    assert fed.startswith(b"".join(replies))
    return replies, False


# --- structured garbage ---------------------------------------------------------------

HUGE = b"9" * 5000  # more digits than int() converts (sys.get_int_max_str_digits)
RESP_TOKENS = [
    b"*", b"$", b":", b"+", b"-", b"\r\n", b"\n", b"\r", b" ", b"\t", b"0", b"1", b"2", b"3",
    b"-1", b"-2", b"10", b"99999999999999999999", HUGE, b"PING", b"GET", b"SET", b"INCR",
    b"MGET", b"EVAL", b"HELLO", b"QUIT", b"k", b"v", b"\x00", b"\xff", b"\"", b"'", b"{",
]
MC_TOKENS = [
    b"get", b"gets", b"gat", b"set", b"add", b"cas", b"append", b"ms", b"mg", b"delete",
    b"incr", b"decr", b"touch", b"version", b"stats", b"quit", b"noreply", b"VALUE", b"END",
    b"STAT", b"STORED", b"ERROR", b"SERVER_ERROR", b" ", b" ", b"\r\n", b"\n", b"\t", b"0",
    b"1", b"5", b"-1", b"4294967296", b"99999999999999999999", HUGE, b"k", b"key", b"x" * 300,
    b"\x00", b"\x80", b"\xff",
]


def garbage(tokens: list[bytes]) -> st.SearchStrategy[bytes]:
    piece = st.one_of(st.sampled_from(tokens), st.binary(max_size=8))
    return st.lists(piece, max_size=40).map(b"".join)


respGarbage = garbage(RESP_TOKENS)
mcGarbage = garbage(MC_TOKENS)
cuts = st.lists(st.integers(0, 10**6), max_size=12)
replyKinds = st.lists(st.sampled_from([VALUES, LINE, STATS]), min_size=1, max_size=12)

redisCommand = st.lists(st.binary(max_size=20), min_size=1, max_size=4).map(
    lambda args: encode([b"ECHO", *args[:1]]) if len(args) == 1 else encode([b"SET", *args[:2]])
)
mcKey = st.binary(min_size=1, max_size=20).filter(
    lambda b: b.split() == [b] and b[:1] != b"\x80" and b"\x00" not in b)
mcCommand = st.one_of(
    mcKey.map(lambda k: b"get " + k + b"\r\n"),
    st.tuples(mcKey, st.binary(max_size=20)).map(
        lambda kv: b"set %s 0 0 %d\r\n%s\r\n" % (kv[0], len(kv[1]), kv[1])),
)

#: Requests that must end in protocol-error (SPEC §4/line), found by review and fuzzing.
REDIS_MALFORMED = [
    b"*1\r\n:12\r\n",
    b"*x\r\n",
    b"*" + HUGE + b"\r\n",
    b"*1\r\n$" + HUGE + b"\r\n",
    b"*2\r\n$4\r\nPING\r\n$-3\r\n",
    b"*1\r\n$4\r\nPINGxx\r\n",
    # lengths with leading zeros: redis answers a protocol error and closes the connection,
    # a pooled member connection that other apps' requests are in flight on
    b"*1\r\n$04\r\nPING\r\n",
    b"*01\r\n$4\r\nPING\r\n",
    b"*2\r\n$3\r\nGET\r\n$001\r\nk\r\n",
]
MC_MALFORMED = [
    b"set k 0 0 notanumber\r\n",
    b"set k 0 0 " + HUGE + b"\r\n",
    b"set k " + HUGE + b" 0 1\r\nx\r\n",
    b"cas k 0 0 1 " + HUGE + b"\r\nx\r\n",
    b"set k 0 0 1\r\nxyz\r\n",
    b"get\r\n",
    b"\x80\x00\x00\x00",
    # storage commands memcached refuses without reading their data block, which it
    # would then run as commands: the pooled member connection's replies out of step
    b"set \x00 0 0 1\r\nx\r\n",
    b"set k\t0 0 1\r\nx\r\n",
    b"set k 0 0\x0b1\r\nx\r\n",
    b"set " + b"x" * 251 + b" 0 0 1\r\nx\r\n",
    b"set k 4294967296 0 1\r\nx\r\n",
    b"set k 0 9223372036854775808 1\r\nx\r\n",
    b"cas k 0 0 1 18446744073709551616\r\nx\r\n",
    # a meta set (unsupported, its block skipped) whose block could never be buffered
    b"ms k 99999999999999999999\r\n",
]


# --- parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", REDIS_MALFORMED, ids=lambda d: repr(d[:24]))
def test_redis_malformed_requests_are_protocol_errors(data: bytes) -> None:
    for route in (ROUTE, HASHED):
        framed = frameRequests(redisDialect.requestParser(route), [encode([b"PING"]) + data])
        assert framed[0][0] == encode([b"PING"])
        assert framed[-1][5:7] == ("protocol-error", True)


@pytest.mark.parametrize("data", MC_MALFORMED, ids=lambda d: repr(d[:24]))
def test_memcached_malformed_requests_are_protocol_errors(data: bytes) -> None:
    for route in (ROUTE, HASHED):
        framed = frameRequests(memcachedDialect.requestParser(route), [b"version\r\n" + data])
        assert framed[0][0] == b"version\r\n"
        assert framed[-1][5:7] == ("protocol-error", True)


def test_huge_numbers_in_replies_are_protocol_errors() -> None:
    for data in (b":" + HUGE + b"\r\n", b"$" + HUGE + b"\r\n", b"*" + HUGE + b"\r\n"):
        assert frameReplies(redisDialect.responseParser(), [data], [None]) == ([], True)
    data = b"VALUE k 0 " + HUGE + b"\r\n"
    assert frameReplies(memcachedDialect.responseParser(), [data], [VALUES]) == ([], True)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(redisCommand, max_size=4), respGarbage, cuts, st.booleans())
@example([], b"*" + HUGE + b"\r\n", [], False)
@example([], b"*1\r\n$" + HUGE + b"\r\n", [3], True)
@example([], b"*3\r\n$4\r\nEVAL\r\n$1\r\ns\r\n$5000\r\n" + HUGE + b"\r\n", [], True)
def test_redis_request_garbage_frames_the_same_however_split(valid, junk, cutPoints, hashed) -> None:
    route = HASHED if hashed else ROUTE
    data = b"".join(valid) + junk
    whole = frameRequests(redisDialect.requestParser(route), [data])
    assert frameRequests(redisDialect.requestParser(route), splitAt(data, cutPoints)) == whole
    # garbage after complete requests never takes them down with it
    assert [r[0] for r in whole[:len(valid)]] == valid


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(mcCommand, max_size=4), mcGarbage, cuts, st.booleans())
@example([], b"set k 0 0 " + HUGE + b"\r\n", [], False)
@example([], b"ms k " + HUGE + b"\r\n", [], False)
def test_memcached_request_garbage_frames_the_same_however_split(valid, junk, cutPoints, hashed) -> None:
    route = HASHED if hashed else ROUTE
    data = b"".join(valid) + junk
    whole = frameRequests(memcachedDialect.requestParser(route), [data])
    assert frameRequests(memcachedDialect.requestParser(route), splitAt(data, cutPoints)) == whole
    assert [r[0] for r in whole[:len(valid)]] == valid


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200).map(lambda b: b + b"\n"), cuts)
def test_plain_garbage_frames_the_same_however_split(junk, cutPoints) -> None:
    whole = frameRequests(plainDialect.requestParser(ROUTE), [junk])
    assert frameRequests(plainDialect.requestParser(ROUTE), splitAt(junk, cutPoints)) == whole
    assert b"".join(r[0] for r in whole) == junk


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(respGarbage, cuts)
@example(b":" + HUGE + b"\r\n", [])
@example(b"$" + HUGE + b"\r\n", [2])
def test_redis_reply_garbage_frames_the_same_however_split(junk, cutPoints) -> None:
    kinds = [None] * 12
    whole = frameReplies(redisDialect.responseParser(), [junk], kinds)
    split = frameReplies(redisDialect.responseParser(), splitAt(junk, cutPoints), kinds)
    assert split == whole


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(mcGarbage, replyKinds, cuts)
@example(b"VALUE k 0 " + HUGE + b"\r\n", [VALUES], [])
def test_memcached_reply_garbage_frames_the_same_however_split(junk, kinds, cutPoints) -> None:
    whole = frameReplies(memcachedDialect.responseParser(), [junk], kinds)
    split = frameReplies(memcachedDialect.responseParser(), splitAt(junk, cutPoints), kinds)
    assert split == whole


# --- the real twistd -------------------------------------------------------------------

from harness import Ambassador, freePort
from redis_peer import memcachedServer, redisServer


@pytest.fixture(scope="module")
def lineRoutes(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One twistd for every example: a redis and a memcached route to a real server each,
    and one of each with ``balance = "hash"`` over two (multi-key commands split)."""
    tmp = tmp_path_factory.mktemp("fuzzline")
    servers = [redisServer(), memcachedServer(), redisServer(), memcachedServer()]
    redisMember, mcMember, redis2, mc2 = servers
    redisPort, mcPort, redisHashPort, mcHashPort = freePort(), freePort(), freePort(), freePort()
    config = (
        '[defaults]\ntimeout = "2s"\ndeadline = "4s"\naccess_log = false\n'
        '[[route]]\nname = "fuzzredis"\nprotocol = "line"\ndialect = "redis"\n'
        f'listen = "tcp:{redisPort}"\nupstreams = ["{redisMember.address}"]\n'
        '[[route]]\nname = "fuzzmc"\nprotocol = "line"\ndialect = "memcached"\n'
        f'listen = "tcp:{mcPort}"\nupstreams = ["{mcMember.address}"]\n'
        '[[route]]\nname = "fuzzredishash"\nprotocol = "line"\ndialect = "redis"\nbalance = "hash"\n'
        f'listen = "tcp:{redisHashPort}"\nupstreams = ["{redisMember.address}", "{redis2.address}"]\n'
        '[[route]]\nname = "fuzzmchash"\nprotocol = "line"\ndialect = "memcached"\nbalance = "hash"\n'
        f'listen = "tcp:{mcHashPort}"\nupstreams = ["{mcMember.address}", "{mc2.address}"]\n'
    )
    amb = Ambassador(tmp, config=config)
    try:
        import redis
        from pymemcache.client.base import Client

        direct = [redis.Redis(port=redisMember.port, protocol=2, socket_timeout=5),
                  Client(("127.0.0.1", mcMember.port), timeout=5),
                  redis.Redis(port=redis2.port, protocol=2, socket_timeout=5),
                  Client(("127.0.0.1", mc2.port), timeout=5)]
        MEMBER_CONNECTIONS[:] = [
            (lambda c=c: c.info("stats")["total_connections_received"]) if i % 2 == 0
            else (lambda c=c: int(c.stats()[b"total_connections"]))
            for i, c in enumerate(direct)
        ]
        # Fill the routes' member connection pools: a pool opens a connection per app
        # connection that first needs a member, up to its size, so an example that spreads
        # its keys differently than the warm-up did would open one more (not a loss).
        seen = None
        for _ in range(6):
            stillServing(amb, amb.process.pid, redisPort, mcPort)
            stillServing(amb, amb.process.pid, redisHashPort, mcHashPort)
            touchEveryMember(redisHashPort, mcHashPort)
            now = memberConnections()
            if now == seen:
                break
            seen = now
        else:
            raise AssertionError(f"member connection pools never settled: {seen}")
        yield amb, redisPort, mcPort, redisHashPort, mcHashPort
    finally:
        MEMBER_CONNECTIONS.clear()
        amb.stop()
        for server in servers:
            server.stop()


#: Per member server, how many connections it has accepted (its own stats).
MEMBER_CONNECTIONS: list[Any] = []


def memberConnections() -> list[int]:
    return [count() for count in MEMBER_CONNECTIONS]


@contextlib.contextmanager
def noMemberConnectionLost() -> Iterator[None]:
    """The pooled member connections all live through the block: garbage from one app
    must never make a member close a connection other apps' requests share."""
    before = memberConnections()
    yield
    after = memberConnections()
    assert after == before, f"members accepted new connections {before} -> {after}: one was lost"


def exchange(port: int, data: bytes, timeout: float = 8.0) -> bytes:
    """Send ``data``, half-close, and read until the ambassador closes (bounded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = []
        end = time.monotonic() + timeout
        while True:
            assert time.monotonic() < end, f"no close after {timeout}s: {b''.join(received)[:300]!r}"
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received.append(chunk)
        return b"".join(received)
    finally:
        sock.close()


def redisReplyAt(data: bytes, pos: int) -> int:
    try:
        return replyEnd(data, pos)
    except _Incomplete:
        raise AssertionError(f"an incomplete reply at {pos}: {data[pos:pos + 200]!r}") from None


def checkAnswers(dialect, route, data: bytes, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    """``answer`` holds exactly one reply per request that ``dialect`` frames in ``data``
    (none for memcached noreply), in order, and the ambassador's own replies where it
    answers itself."""
    requests = []
    parser = dialect.requestParser(route)
    requests = parser.feed(data)
    replies = dialect.responseParser()
    replies.feed(answer)
    pos = 0
    for i, request in enumerate(requests):
        if request.error is not None:
            expected = dialect.errorReply(request.error)
            assert answer[pos:pos + len(expected)] == expected, (i, request, answer[pos:pos + 200])
            pos += len(expected)
        elif request.localReply is not None:
            assert answer[pos:pos + len(request.localReply)] == request.localReply
            pos += len(request.localReply)
        elif not request.expectsReply:
            continue
        elif dialect is redisDialect:
            pos = redisReplyAt(answer, pos)
        else:
            replies = dialect.responseParser()
            replies.feed(answer[pos:])
            reply = replies.next(request.kind)
            assert reply is not None, (i, request, answer[pos:pos + 200])
            pos += len(reply)
    assert answer[pos:] == b"", (
        f"{len(requests)} requests, answer has more: {answer[pos:pos + 200]!r}"
    )


def readAtLeast(sock: socket.socket, size: int) -> bytes:
    """Read until ``size`` bytes came or the peer closed (the socket's timeout bounds it)."""
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def touchEveryMember(redisHashPort: int, mcHashPort: int) -> None:
    """``POOL_SIZE`` app connections at once, each with a multi-key read whose keys land on
    every member of the hashed routes, so each member's pool reaches its size."""
    keys = [b"fill%d" % i for i in range(32)]
    requests = ((redisHashPort, b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)
                 + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys),
                 b"*%d\r\n" % len(keys) + b"$-1\r\n" * len(keys)),
                (mcHashPort, b"get " + b" ".join(keys) + b"\r\n", b"END\r\n"))
    for port, request, expected in requests:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(POOL_SIZE)]
        try:
            for sock in socks:
                sock.sendall(request)
            for sock in socks:
                got = readAtLeast(sock, len(expected))
                assert got == expected, (port, got[:200])
        finally:
            for sock in socks:
                sock.close()


def stillServing(amb: Ambassador, pid: int, redisPort: int, mcPort: int) -> None:
    """Same pid, and both routes answer right on several app connections at once: they
    share the route's few pooled member connections, so a member connection left out
    of step by the garbage (one reply too many or too few) shows on one of them."""
    assert amb.process.poll() is None and amb.process.pid == pid
    for port, request, reply in ((redisPort, b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n", b"$%d\r\n%s\r\n"),
                                 (mcPort, b"get %s\r\n", b"END\r\n")):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        try:
            for i, sock in enumerate(socks):
                token = b"alive%d" % i
                sock.sendall(request % ((len(token), token) if port == redisPort else (token,)))
            for i, sock in enumerate(socks):
                token = b"alive%d" % i
                expected = reply % ((len(token), token) if port == redisPort else ())
                got = readAtLeast(sock, len(expected))
                assert got == expected, (port, i, got)
        finally:
            for sock in socks:
                sock.close()


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(redisCommand, max_size=3), respGarbage)
@example([], b"*1\r\n$" + HUGE + b"\r\n")
def test_garbage_to_a_real_redis_route_is_answered_in_order(lineRoutes, valid, junk) -> None:
    amb, redisPort, mcPort, *_ = lineRoutes
    with noMemberConnectionLost():
        data = b"".join(valid) + junk
        answer = exchange(redisPort, data)
        checkAnswers(redisDialect, ROUTE, data, answer)
        stillServing(amb, amb.process.pid, redisPort, mcPort)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mcCommand, max_size=3), mcGarbage)
@example([], b"set k 0 0 " + HUGE + b"\r\n")
def test_garbage_to_a_real_memcached_route_is_answered_in_order(lineRoutes, valid, junk) -> None:
    amb, redisPort, mcPort, *_ = lineRoutes
    with noMemberConnectionLost():
        data = b"".join(valid) + junk
        answer = exchange(mcPort, data)
        checkAnswers(memcachedDialect, ROUTE, data, answer)
        stillServing(amb, amb.process.pid, redisPort, mcPort)


@pytest.mark.parametrize("data", REDIS_MALFORMED, ids=lambda d: repr(d[:24]))
def test_malformed_redis_request_to_real_route_gets_protocol_error_and_close(lineRoutes, data) -> None:
    amb, redisPort, mcPort, *_ = lineRoutes
    pid = amb.process.pid
    sock = socket.create_connection(("127.0.0.1", redisPort), timeout=5)
    try:
        sock.sendall(b"PING\r\n" + data)  # no half-close: the ambassador must close by itself
        answer = b""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError(f"not closed: {answer!r}")
    finally:
        sock.close()
    assert answer == b"+PONG\r\n-ERR ambassador protocol-error\r\n"
    stillServing(amb, pid, redisPort, mcPort)


@pytest.mark.parametrize("data", MC_MALFORMED, ids=lambda d: repr(d[:24]))
def test_malformed_memcached_request_to_real_route_gets_protocol_error_and_close(lineRoutes, data) -> None:
    amb, redisPort, mcPort, *_ = lineRoutes
    pid = amb.process.pid
    sock = socket.create_connection(("127.0.0.1", mcPort), timeout=5)
    try:
        sock.sendall(b"version\r\n" + data)
        answer = b""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError(f"not closed: {answer!r}")
    finally:
        sock.close()
    assert answer.startswith(b"VERSION ")
    assert answer.endswith(b"\r\nSERVER_ERROR ambassador protocol-error\r\n")
    assert answer.count(b"\r\n") == 2
    stillServing(amb, pid, redisPort, mcPort)


multiKey = st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"k", b"key", b"x" * 30]), min_size=1, max_size=6)
redisMulti = st.one_of(
    multiKey.map(lambda ks: encode([b"MGET", *ks])),
    multiKey.map(lambda ks: encode([b"DEL", *ks])),
    multiKey.map(lambda ks: encode([b"EXISTS", *ks])),
    multiKey.map(lambda ks: encode([b"MSET", *(x for k in ks for x in (k, b"v" + k))])),
    multiKey.map(lambda ks: encode([b"MSET", *ks])),  # odd: not split, redis answers the error
)
mcMulti = st.one_of(
    multiKey.map(lambda ks: b"get " + b" ".join(ks) + b"\r\n"),
    multiKey.map(lambda ks: b"gets " + b" ".join(ks) + b"\r\n"),
    multiKey.map(lambda ks: b"".join(b"set %s 0 0 1\r\nv\r\n" % k for k in ks)),
)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(redisMulti, redisCommand), max_size=4), respGarbage)
def test_garbage_to_a_real_hashed_redis_route_is_answered_in_order(lineRoutes, valid, junk) -> None:
    amb, _, mcPort, redisHashPort, _ = lineRoutes
    with noMemberConnectionLost():
        data = b"".join(valid) + junk
        answer = exchange(redisHashPort, data)
        checkAnswers(redisDialect, HASHED, data, answer)
        stillServing(amb, amb.process.pid, redisHashPort, mcPort)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mcMulti, mcCommand), max_size=4), mcGarbage)
def test_garbage_to_a_real_hashed_memcached_route_is_answered_in_order(lineRoutes, valid, junk) -> None:
    amb, redisPort, _, _, mcHashPort = lineRoutes
    with noMemberConnectionLost():
        data = b"".join(valid) + junk
        answer = exchange(mcHashPort, data)
        checkAnswers(memcachedDialect, HASHED, data, answer)
        stillServing(amb, amb.process.pid, redisPort, mcHashPort)


# --- in process: the redis route against a model member, faults at random points -------

from twisted.internet import error as ierror
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ambassador.config import BreakerPolicy, RetryPolicy
from ambassador.protocols.line.protocol import LineFactory
from ambassador.resilience.core import RouteCore

MODEL_REASONS = {"connect-failure", "reset", "timeout", "deadline", "breaker-open", "budget-exhausted"}


class ModelRedis:
    """Members that share one keyspace (replicas, as the chaos rigs' proxies share one
    redis-server): each member connection is a StringTransport whose written commands
    the test applies and answers when it chooses, or loses."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.connections: list[Any] = []  # [protocol, consumed offset, pending commands, lost]
        self.refuse = False
        self.applied: Counter[bytes] = Counter()

    def endpoint(self, upstream: str) -> Any:
        model = self

        class Endpoint:
            def connect(self, factory: Any) -> Any:
                if model.refuse:
                    return fail(ierror.ConnectionRefusedError())
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(StringTransport())
                model.connections.append([protocol, 0, [], False])
                return succeed(protocol)

        return Endpoint()

    def poll(self) -> None:
        """Frame what the route wrote since; let the reactor see closed transports."""
        for entry in self.connections:
            protocol, consumed, pending, lost = entry
            if lost:
                continue
            data = protocol.transport.value()
            parser = redisDialect.requestParser(ROUTE)
            for request in parser.feed(data[consumed:]):
                pending.append(request.info or _args(request.raw))
                consumed += len(request.raw)
            entry[1] = consumed
            if protocol.transport.disconnecting:
                entry[3] = True
                protocol.connectionLost(Failure(ierror.ConnectionDone()))

    def apply(self, args: list[bytes]) -> bytes:
        name = args[0].upper()
        if name == b"ECHO":
            return _bulk(args[1])
        if name == b"SET":
            self.data[args[1]] = args[2]
            return b"+OK\r\n"
        if name == b"GET":
            value = self.data.get(args[1])
            return b"$-1\r\n" if value is None else _bulk(value)
        if name == b"INCR":
            self.applied[args[1]] += 1
            value = int(self.data.get(args[1], b"0")) + 1
            self.data[args[1]] = b"%d" % value
            return b":%d\r\n" % value
        raise AssertionError(f"unexpected command {args!r}")

    def live(self) -> list[list[Any]]:
        return [entry for entry in self.connections if not entry[3]]


def _args(raw: bytes) -> list[bytes]:
    from ambassador.protocols.line.redis import _arguments

    return _arguments(raw)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


command = st.one_of(
    st.integers(0, 10**6).map(lambda n: [b"ECHO", b"e%d" % n]),
    st.integers(0, 10**6).map(lambda n: [b"SET", b"k%d" % n, b"v%d" % n]),
    st.integers(0, 2).map(lambda n: [b"INCR", b"c%d" % n]),
    st.integers(0, 10**6).map(lambda n: [b"GET", b"k%d" % n]),
)
action = st.one_of(
    st.tuples(st.just("send"), st.lists(command, min_size=1, max_size=6), cuts),
    st.tuples(st.just("answer"), st.integers(0, 7), st.integers(1, 5), st.integers(0, 10**6)),
    st.tuples(st.just("lose"), st.integers(0, 7), st.integers(0, 5)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.05, 0.3, 0.6, 1.1, 1.1, 2.0])),
    st.tuples(st.just("wait"), st.sampled_from([1.1, 2.0])),
    st.tuples(st.just("refuse"), st.booleans()),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(action, min_size=1, max_size=25))
def test_in_process_every_command_gets_one_answer_in_order_whatever_the_members_do(actions) -> None:
    """Commands pipelined by one app connection over two members that answer late,
    partly, in pieces, lose their connections after applying some commands, or refuse
    new ones: every command gets exactly one answer, in order, by the deadline: its
    own (an ECHO its token, a SET +OK, an INCR a number, a GET a bulk string: the two
    members run commands in their own order, so not necessarily the last value
    written) or an error with a SPEC reason; an INCR answered is applied exactly once,
    and none is applied more often than it was answered or failed after being written."""
    model = ModelRedis()
    clock = Clock()
    route = Route(
        name="r", protocol="line", listen="tcp:1", upstreams=("tcp:127.0.0.1:9", "tcp:127.0.0.1:10"),
        timeout=1.0, deadline=3.0, connectTimeout=0.5,
        retry=RetryPolicy(attempts=3, backoffBase=0.01, backoffMax=0.05, budgetRatio=1.0),
        breaker=BreakerPolicy(failureThreshold=1000), options={"dialect": "redis"},
    )
    core = RouteCore(route, clock, model.endpoint, None, random=lambda: 0.5)
    app = LineFactory(route, core, clock, redisDialect).buildProtocol(None)
    appTransport = StringTransport()
    app.makeConnection(appTransport)
    sent: list[list[bytes]] = []
    for step in actions:
        kind = step[0]
        if kind == "send":
            commands = step[1]
            sent += commands
            for piece in splitAt(b"".join(encode(c) for c in commands), step[2]):
                app.dataReceived(piece)
        elif kind == "answer":
            live = model.live()
            if live:
                entry = live[step[1] % len(live)]
                replies = b"".join(model.apply(args) for args in entry[2][:step[2]])
                del entry[2][:step[2]]
                for piece in splitAt(replies, [step[3]]):
                    entry[0].dataReceived(piece)
        elif kind == "lose":
            live = model.live()
            if live:
                entry = live[step[1] % len(live)]
                for args in entry[2][:step[2]]:  # applied, the answer lost with the connection
                    model.apply(args)
                entry[2].clear()
                entry[3] = True
                entry[0].connectionLost(Failure(ierror.ConnectionLost()))
        elif kind == "wait":
            clock.advance(step[1])
        else:
            model.refuse = step[1]
        clock.advance(0)  # the batcher's end-of-iteration writes
        model.poll()
    # Members answer everything now (or the deadline ends what they do not).
    model.refuse = False
    for _ in range(200):
        clock.advance(0)
        model.poll()
        for entry in model.live():
            replies = b"".join(model.apply(args) for args in entry[2])
            entry[2].clear()
            if replies:
                entry[0].dataReceived(replies)
        clock.advance(0.05)
    answer = appTransport.value()
    pos = 0
    incrOk: Counter[bytes] = Counter()
    incrMaybe: Counter[bytes] = Counter()
    for i, args in enumerate(sent):
        end = redisReplyAt(answer, pos) if pos < len(answer) else None
        assert end is not None, f"command {i} {args!r} of {len(sent)} got no answer: {answer[pos:]!r}"
        reply, pos = answer[pos:end], end
        if reply.startswith(b"-ERR ambassador "):
            reason = reply[16:-2].decode()
            assert reason in MODEL_REASONS, reply
            if args[0] == b"INCR" and reason not in ("connect-failure", "breaker-open"):
                incrMaybe[args[1]] += 1
            continue
        name = args[0]
        if name == b"ECHO":
            assert reply == _bulk(args[1]), (i, args, reply)
        elif name == b"SET":
            assert reply == b"+OK\r\n", (i, args, reply)
        elif name == b"INCR":
            assert reply.startswith(b":"), (i, args, reply)
            incrOk[args[1]] += 1
        else:
            assert reply.startswith((b"$", b"*")), (i, args, reply)
    assert answer[pos:] == b"", f"answers beyond the {len(sent)} commands: {answer[pos:]!r}"
    for key in set(incrOk) | set(model.applied):
        assert incrOk[key] <= model.applied[key] <= incrOk[key] + incrMaybe[key], (
            key, incrOk[key], model.applied[key], incrMaybe[key])
