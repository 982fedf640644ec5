"""The http route's request parsing path fuzzed (issue 9; SPEC §4/http: malformed
request line or headers -> 400, a head over 64 KiB -> 431, both Content-Length and
Transfer-Encoding or two Content-Lengths -> 400, too slow a head -> 408; none of these
reach an upstream).

Three kinds of input, each split at random points on the wire:

- *valid* requests (random method, path, end-to-end headers, Content-Length body):
  answered by the member, exactly once, with its headers and body passed through;
- *invalid* ones, a valid request with one known defect: answered with the SPEC status,
  closed, and the member receives not one byte;
- *garbage*, token soup and random bytes with no oracle: whatever comes back parses as
  HTTP responses, the ambassador's own answers are 400/431/408/501, and when the first
  answer is a rejection the member received nothing.

Twice: in-process against the app protocol over a StringTransport (a ``task.Clock``,
a fake member endpoint, thousands of examples a second), and against one real twistd
whose member is a real HTTP server that records every byte it receives; after every
example that twistd still serves a valid request with the same pid.
"""

from __future__ import annotations

import socket
import threading
import time
from types import MappingProxyType
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransportWithDisconnection

from ambassador.config import RetryPolicy, Route
from ambassador.protocols.http import httpProtocol
from ambassador.resilience.core import RouteCore

# --- inputs ----------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Headers the route handles itself (framing, hop-by-hop): not generated as end-to-end ones.
SPECIAL = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
           "trailer", "upgrade", "expect", "proxy-connection", "proxy-authorization",
           "proxy-authenticate"}

headerName = st.text(TCHAR, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in SPECIAL and not n.lower().startswith("proxy-"))
headerValue = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
pathPart = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@", max_size=12)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])


class Counter:
    value = 0


def nextId() -> str:
    Counter.value += 1
    return f"fz{Counter.value}"


@st.composite
def validRequest(draw: Any) -> dict[str, Any]:
    method = draw(methods)
    path = f"/{nextId()}/{draw(pathPart)}"
    if draw(st.booleans()):
        path += "?" + draw(pathPart)
    headers = draw(st.lists(st.tuples(headerName, headerValue), max_size=6,
                            unique_by=lambda h: h[0].lower()))
    withBody = method in ("POST", "PUT", "PATCH")
    body = draw(st.binary(max_size=200)) if withBody else b""
    # a body sent chunked, in chunks of random sizes (some with extensions), or not
    chunks = draw(st.one_of(st.none(), st.lists(st.integers(1, 64), max_size=5))) if withBody else None
    expect = withBody and draw(st.booleans())  # Expect: 100-continue
    return {"method": method, "path": path, "headers": headers, "body": body, "chunks": chunks,
            "expect": expect}


def encodeRequest(request: dict[str, Any], close: bool = True, extra: bytes = b"") -> bytes:
    lines = [f"{request['method']} {request['path']} HTTP/1.1", "Host: app.example"]
    lines += [f"{n}: {v}" for n, v in request["headers"]]
    body = request["body"]
    sizes = request.get("chunks")
    if sizes is not None:
        lines.append("Transfer-Encoding: chunked")
        wire, rest = [], body
        for i, size in enumerate(sizes * (len(body) // max(1, sum(sizes)) + 1) if sizes else []):
            if not rest:
                break
            chunk, rest = rest[:size], rest[size:]
            wire.append(b"%x%s\r\n%s\r\n" % (len(chunk), b";ext=%d" % i if i % 2 else b"", chunk))
        if rest:
            wire.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        body = b"".join(wire) + b"0\r\n\r\n"
    elif body or request["method"] in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    if request.get("expect"):
        lines.append("Expect: 100-continue")
    if close:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n" + body


def finalResponses(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without the interim 100 Continue answers (to Expect: 100-continue)."""
    return [r for r in responses if r["status"] != 100]


def _head(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n".encode()


#: A valid request with one defect -> the status SPEC §4/http gives it.
DEFECTS: dict[str, tuple[Any, int]] = {
    "space in a header name": (lambda p: _head(p) + b"Bad Name: x\r\n\r\n", 400),
    "a header line without colon": (lambda p: _head(p) + b"NoColon\r\n\r\n", 400),
    "empty header name": (lambda p: _head(p) + b": x\r\n\r\n", 400),
    "space before the colon": (lambda p: _head(p) + b"X-A : y\r\n\r\n", 400),
    "NUL in a header value": (lambda p: _head(p) + b"X-A: a\x00b\r\n\r\n", 400),
    "control char in a header value": (lambda p: _head(p) + b"X-A: a\x01b\r\n\r\n", 400),
    "obs-fold": (lambda p: _head(p) + b"X-A: a\r\n folded\r\n\r\n", 400),
    "Content-Length and Transfer-Encoding": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), 400),
    "two different Content-Lengths": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".encode(), 400),
    "negative Content-Length": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".encode(), 400),
    "Content-Length list": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx".encode(), 400),
    "Transfer-Encoding not chunked": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".encode(), 400),
    "Transfer-Encoding chunked then gzip": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".encode(), 400),
    "unknown HTTP version": (lambda p: f"GET {p} HTTP/1.7\r\nHost: a\r\n\r\n".encode(), 400),
    "bad method token": (lambda p: f"G@T {p} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 400),
    "space in the target": (lambda p: f"GET {p} x HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 400),
    "control char in the target": (lambda p: f"GET {p}\x01 HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 400),
    "bare LF line ends": (lambda p: f"GET {p} HTTP/1.1\nHost: a\n\n".encode(), 400),
    "no HTTP version (HTTP/0.9)": (lambda p: f"GET {p}\r\nHost: a\r\n\r\n".encode(), 400),
    "head over 64 KiB": (lambda p: _head(p) + b"X-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n", 431),
    "many headers over 64 KiB": (
        lambda p: _head(p) + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)) + b"\r\n", 431),
    "websocket upgrade": (
        lambda p: _head(p) + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
    "CONNECT": (lambda p: f"CONNECT {p[1:]}:443 HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 501),
}

GARBAGE_TOKENS = [
    b"GET", b"POST", b"HEAD", b" ", b"/", b"/x", b"?", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"\r\n",
    b"\n", b"\r", b"Host: a", b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked", b"Connection: close", b"Connection: upgrade", b"Upgrade: x",
    b"Expect: 100-continue", b":", b"\x00", b"\xff", b"\t", b"0\r\n\r\n", b"5\r\nhello\r\n",
    b"ffffffffffffffffff\r\n", b"X-A: b", b"abcde",
]
garbage = st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(st.sampled_from(GARBAGE_TOKENS), st.binary(max_size=4)), max_size=30).map(b"".join),
)
cuts = st.lists(st.integers(0, 10**6), max_size=6)


def splitAt(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({c % (len(data) + 1) for c in points})
    pieces, last = [], 0
    for p in marks:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


# --- reading responses -------------------------------------------------------------------


def parseResponses(data: bytes) -> list[dict[str, Any]]:
    """The HTTP/1.1 responses in ``data`` (Content-Length framed, as both the ambassador's
    own and our members' are: they answer HEAD with ``Content-Length: 0``); fails on
    bytes that are not a response."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"a partial response head: {data[pos:pos + 200]!r}"
        lines = data[pos:end].split(b"\r\n")
        version, status, _ = (lines[0] + b" ").split(b" ", 2)
        assert version == b"HTTP/1.1" and status.isdigit(), f"not a status line: {lines[0]!r}"
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"not a header line: {line!r}"
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        assert b"transfer-encoding" not in headers
        body = data[end + 4:end + 4 + length]
        assert len(body) == length, f"a truncated body: {data[pos:pos + 200]!r}"
        out.append({"status": int(status), "headers": headers, "body": body})
        pos = end + 4 + length
    return out


# --- in process: the app protocol over StringTransports -------------------------------


class FakeMemberEndpoint:
    """Member connections that are StringTransports; what the route writes stays there."""

    def __init__(self) -> None:
        self.connections: list[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(protocol)
        return succeed(protocol)


ROUTE = Route(
    name="fuzz", protocol="http", listen="tcp:1", upstreams=("tcp:10.0.0.1:8000",),
    timeout=2.0, deadline=5.0, headerTimeout=1.0, idleTimeout=30.0, retry=RetryPolicy(attempts=1),
    options=MappingProxyType({
        "retry_on": ("connect-failure", "reset", "timeout", "502", "503", "504"),
        "retry_methods": ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"),
        "host_header": None, "max_retry_body": 1024, "trace": False,
    }),
)


def inProcess() -> tuple[Any, Any, FakeMemberEndpoint, task.Clock]:
    clock = task.Clock()
    endpoint = FakeMemberEndpoint()
    core = RouteCore(ROUTE, clock, lambda upstream: endpoint, None)
    app = httpProtocol.buildFactory(ROUTE, core, clock).buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = app
    app.makeConnection(transport)
    return app, transport, endpoint, clock


class StrictRequests:
    """Parses what the route wrote to a member with llhttp, strictly."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.messages.append({"url": b"", "headers": [], "body": b"", "complete": False})

    def on_url(self, url: bytes) -> None:
        self.messages[-1]["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1]["headers"].append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.messages[-1]["method"] = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body

    def on_message_complete(self) -> None:
        self.messages[-1]["complete"] = True


def memberSaw(endpoint: FakeMemberEndpoint) -> list[dict[str, Any]]:
    """Every request written to the fake members; fails if any member stream is not
    strictly valid HTTP/1.1 (a smuggled or broken request)."""
    seen = []
    for protocol in endpoint.connections:
        strict = StrictRequests()
        data = protocol.transport.value()
        try:
            strict.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise AssertionError(f"the route wrote invalid HTTP to a member ({e}): {data[:300]!r}") from None
        seen += strict.messages
    return seen


def feed(app: Any, pieces: list[bytes]) -> None:
    for piece in pieces:
        if not app.transport.connected:
            break
        app.dataReceived(piece)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(validRequest(), cuts)
def test_in_process_valid_requests_reach_the_member_once_as_sent(request, points) -> None:
    app, transport, endpoint, _ = inProcess()
    feed(app, splitAt(encodeRequest(request), points))
    seen = memberSaw(endpoint)
    assert len(seen) == 1 and seen[0]["complete"]
    message = seen[0]
    assert message["method"] == request["method"].encode()
    assert message["url"] == request["path"].encode()
    assert message["body"] == request["body"]
    names = [name for name, _ in message["headers"]]
    assert b"connection" not in names and names.count(b"host") == 1
    assert b"expect" not in names  # the route answers 100 Continue itself
    for name, value in request["headers"]:
        assert (name.lower().encode(), value.encode()) in message["headers"]
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    [response] = finalResponses(parseResponses(transport.value()))
    assert (response["status"], response["body"]) == (200, b"ok")


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(validRequest(), min_size=2, max_size=4), cuts, st.booleans())
def test_in_process_pipelined_requests_answered_in_order(requests, points, defectLast) -> None:
    """Keep-alive requests sent back to back, split anywhere: each reaches a member once,
    in order, and the answers come back in order; a defective request after them is
    answered after theirs, and reaches no member."""
    app, transport, endpoint, _ = inProcess()
    wire = b"".join(encodeRequest(r, close=False) for r in requests)
    if defectLast:
        wire += DEFECTS["space in a header name"][0](f"/{nextId()}")
    feed(app, splitAt(wire, points))
    answered: dict[int, int] = {}
    for _ in range(4 * len(requests)):  # bounded: one answer per turn
        pending = [(i, m) for i, m in enumerate(endpoint.connections)
                   if m.transport.connected and len(memberSawOne(m)) > answered.get(i, 0)]
        if not pending:
            break
        i, member = pending[0]
        message = memberSawOne(member)[answered.get(i, 0)]
        answered[i] = answered.get(i, 0) + 1
        member.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(message["url"]), message["url"]))
    seen = memberSaw(endpoint)
    assert [m["url"] for m in seen] == [r["path"].encode() for r in requests]
    assert [m["body"] for m in seen] == [r["body"] for r in requests]
    responses = finalResponses(parseResponses(transport.value()))
    assert [r["body"] for r in responses[:len(requests)]] == [r["path"].encode() for r in requests]
    assert all(r["status"] == 200 for r in responses[:len(requests)])
    if defectLast:  # answered 400 after the others, or closed without an answer
        assert [r["status"] for r in responses[len(requests):]] in ([400], [])
        assert not transport.connected
    else:
        assert len(responses) == len(requests) and transport.connected


def memberSawOne(protocol: Any) -> list[dict[str, Any]]:
    strict = StrictRequests()
    strict.parser.feed_data(protocol.transport.value())
    return [m for m in strict.messages if m["complete"]]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(sorted(DEFECTS)), cuts)
def test_in_process_invalid_requests_never_reach_a_member(defect, points) -> None:
    build, status = DEFECTS[defect]
    app, transport, endpoint, clock = inProcess()
    feed(app, splitAt(build(f"/{nextId()}"), points))
    clock.advance(ROUTE.headerTimeout + 0.1)  # a head the parser still waits on ends in 408
    assert endpoint.connections == [], f"{defect}: a member connection was made"
    [response] = parseResponses(transport.value())
    assert response["status"] == status, defect
    assert response["headers"][b"x-ambassador-attempts"] == b"0"
    assert not transport.connected, f"{defect}: the connection stays open"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(garbage, cuts)
@example(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", [40])
@example(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", [])
def test_in_process_garbage_never_raises_nor_smuggles(junk, points) -> None:
    app, transport, endpoint, clock = inProcess()
    feed(app, splitAt(junk, points))
    seen = memberSaw(endpoint)  # what reached a member is strictly valid HTTP
    for protocol in endpoint.connections:
        if protocol.transport.connected:
            head = protocol.transport.value().startswith(b"HEAD ")
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if head
                                  else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    clock.advance(ROUTE.headerTimeout + 0.1)
    clock.advance(ROUTE.timeout + 0.1)
    responses = parseResponses(transport.value())
    own = [r["status"] for r in responses if b"x-ambassador-error" in r["headers"]]
    assert set(own) <= {400, 408, 431, 501, 502, 504}, own
    if responses and responses[0]["status"] in (400, 408, 431, 501):
        assert seen == [], "a rejected first request reached a member"


# --- the real twistd ---------------------------------------------------------------------


class RecordingMember:
    """A real HTTP/1.1 member (threads, bounded): records every byte it receives and every
    request it parses; answers each request 200 with the request's target as the body."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.received = 0
        self.requests: list[dict[str, Any]] = []
        self.errors: list[bytes] = []
        self.stopping = threading.Event()
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            with self.lock:
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        strict = StrictRequests()
        answered = 0
        try:
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.received += len(data)
                try:
                    strict.parser.feed_data(data)
                except httptools.HttpParserError:
                    with self.lock:
                        self.errors.append(data)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    break
                for message in strict.messages[answered:]:
                    if not message["complete"]:
                        break
                    answered += 1
                    with self.lock:
                        self.requests.append(message)
                    body = b"" if message.get("method") == b"HEAD" else message["url"]
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nx-member: yes\r\n\r\n" % len(body)
                    conn.sendall(head + body)
        except OSError:
            pass
        finally:
            conn.close()

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.received, len(self.requests)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.close()
                except OSError:
                    pass
        self.thread.join(2)


from harness import Ambassador, freePort

HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def routed(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One twistd for every example: (ambassador, listen port, member)."""
    member = RecordingMember()
    listen = freePort()
    config = (
        f'[defaults]\nheader_timeout = "{HEADER_TIMEOUT}s"\ntimeout = "3s"\ndeadline = "5s"\n'
        '[defaults.retry]\nattempts = 1\n'
        '[[route]]\nname = "fuzzhttp"\nprotocol = "http"\n'
        f'listen = "tcp:{listen}"\nupstreams = ["tcp:127.0.0.1:{member.port}"]\naccess_log = false\n'
    )
    amb = Ambassador(tmp_path_factory.mktemp("fuzzhttp"), config=config)
    try:
        yield amb, listen, member
    finally:
        amb.stop()
        member.stop()


def roundTrip(port: int, pieces: list[bytes], idle: float = 0.3, bound: float = 5.0) -> tuple[bytes, bool]:
    """Send the pieces (a short pause between them, so they go as separate segments),
    then read until the ambassador closes, or nothing came for ``idle`` seconds."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=bound)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = b""
    closed = False
    try:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(0.002)
            try:
                sock.sendall(piece)
            except OSError:  # closed on us mid-send: what came back is the answer
                break
        sock.settimeout(idle)
        end = time.monotonic() + bound
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        sock.close()
    return received, closed


def stillServing(amb: Ambassador, pid: int, port: int) -> None:
    assert amb.process.poll() is None and amb.process.pid == pid, "the ambassador died"
    path = f"/{nextId()}/alive"
    data, _ = roundTrip(port, [f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()])
    [response] = parseResponses(data)
    assert (response["status"], response["body"]) == (200, path.encode())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(validRequest(), cuts)
def test_real_valid_requests_reach_the_member_once(routed, request, points) -> None:
    amb, port, member = routed
    pid = amb.process.pid
    before = member.snapshot()[1]
    data, closed = roundTrip(port, splitAt(encodeRequest(request), points))
    [response] = finalResponses(parseResponses(data))
    assert response["status"] == 200 and response["headers"].get(b"x-member") == b"yes", response
    assert response["body"] == request["path"].encode()
    assert closed  # Connection: close was asked for
    with member.lock:
        mine = [m for m in member.requests[before:] if m["url"] == request["path"].encode()]
    assert len(mine) == 1 and mine[0]["body"] == request["body"]
    stillServing(amb, pid, port)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(DEFECTS)), cuts)
def test_real_invalid_requests_are_refused_and_never_reach_the_member(routed, defect, points) -> None:
    amb, port, member = routed
    pid = amb.process.pid
    build, status = DEFECTS[defect]
    before = member.snapshot()
    data, closed = roundTrip(port, splitAt(build(f"/{nextId()}"), points), idle=HEADER_TIMEOUT + 2)
    assert member.snapshot() == before, f"{defect}: bytes reached the member"
    [response] = parseResponses(data)
    assert response["status"] == status, (defect, data[:300])
    assert b"x-ambassador-error" in response["headers"]
    assert closed, f"{defect}: the connection stays open"
    stillServing(amb, pid, port)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(garbage, cuts)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", [30])
def test_real_garbage_is_refused_or_served_and_the_process_lives(routed, junk, points) -> None:
    amb, port, member = routed
    pid = amb.process.pid
    before = member.snapshot()
    data, _ = roundTrip(port, splitAt(junk, points))
    after = member.snapshot()
    responses = parseResponses(data)
    own = [r["status"] for r in responses if b"x-ambassador-error" in r["headers"]]
    assert set(own) <= {400, 408, 431, 501, 502, 504}, own
    if responses and responses[0]["status"] in (400, 408, 431, 501):
        assert after == before, "a rejected first request reached the member"
    with member.lock:
        assert member.errors == [], f"the member got invalid HTTP: {member.errors[:1]!r}"
    stillServing(amb, pid, port)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(validRequest(), min_size=1, max_size=3), st.sampled_from(sorted(DEFECTS)), cuts)
def test_real_pipelined_requests_before_a_bad_one_are_answered_first(routed, requests, defect, points) -> None:
    amb, port, member = routed
    pid = amb.process.pid
    badPath = f"/{nextId()}"
    before = member.snapshot()[1]
    wire = b"".join(encodeRequest(r, close=False) for r in requests) + DEFECTS[defect][0](badPath)
    data, closed = roundTrip(port, splitAt(wire, points), idle=HEADER_TIMEOUT + 2)
    responses = finalResponses(parseResponses(data))
    assert [(r["status"], r["body"]) for r in responses[:len(requests)]] == [
        (200, r["path"].encode()) for r in requests], (defect, data[:400])
    assert [r["status"] for r in responses[len(requests):]] in ([DEFECTS[defect][1]], []), defect
    assert closed
    with member.lock:
        urls = [m["url"] for m in member.requests[before:]]
        assert member.errors == []
    assert urls == [r["path"].encode() for r in requests], (defect, urls)
    stillServing(amb, pid, port)


def test_real_slow_head_gets_408_and_never_reaches_the_member(routed) -> None:
    amb, port, member = routed
    before = member.snapshot()
    started = time.monotonic()
    data, closed = roundTrip(port, [b"GET /slow HTTP/1.1\r\nHost: a\r\nX-A: "], idle=HEADER_TIMEOUT + 2)
    assert time.monotonic() - started < HEADER_TIMEOUT + 2
    [response] = parseResponses(data)
    assert response["status"] == 408 and closed
    assert member.snapshot() == before
    stillServing(amb, amb.process.pid, port)
