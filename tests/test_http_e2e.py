"""The http route from outside (SPEC §4/http): the real twistd, a real HTTP upstream
(``http.server`` in a thread), real clients (``http.client``, raw sockets, curl).

The upstream's behaviour is chosen per request by its path, and it counts what it
sees (hits per path, connections), so tests can check what reached a member.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from harness import Ambassador, freePort


class Upstream:
    """A small HTTP/1.1 keep-alive server whose answers tests script by path.

    ``/echo``: JSON of method, path, headers, body.  ``/flaky?key=K&fail=N&how=503|reset``:
    the first N hits of key K fail.  ``/big?size=N``: N bytes, streamed.  ``/hang``:
    never answers (until the test ends).  ``/garbage``: not HTTP.  ``/status?code=C``:
    that status (``retry_after=S`` adds Retry-After).
    """

    def __init__(self) -> None:
        self.port = freePort()
        self.hits: dict[str, int] = {}
        self.connections = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Without it, headers and body go out as two segments and Nagle +
                # delayed ACK add 40 ms to every keep-alive request.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with upstream.lock:
                    upstream.connections += 1

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):
                    self.close_connection = True

            def _handle(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self._body()
                with upstream.lock:
                    key = url.path + ":" + query.get("key", "")
                    upstream.hits[key] = upstream.hits.get(key, 0) + 1
                    hit = upstream.hits[key]
                if url.path == "/echo":
                    answer = {
                        "method": self.command, "path": self.path,
                        "headers": [[k, v] for k, v in self.headers.items()],
                        "body": body.decode("latin-1"),
                    }
                    self._send(200, json.dumps(answer).encode(),
                               {"Content-Type": "application/json", "X-Upstream": "yes",
                                "Connection": "keep-alive, X-Hop", "X-Hop": "drop me",
                                "Keep-Alive": "timeout=5"})
                elif url.path == "/flaky":
                    if hit <= int(query.get("fail", "1")):
                        if query.get("how") == "reset":
                            self.connection.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                            self.connection.close()
                            self.close_connection = True
                            return
                        self._send(503, b"busy\n", {"Retry-After": query.get("retry_after", "0")}
                                   if "retry_after" in query else None)
                    else:
                        self._send(200, b"fine %d\n" % hit)
                elif url.path == "/sink":
                    import hashlib
                    self._send(200, b"%d %s" % (len(body), hashlib.md5(body).hexdigest().encode()))
                elif url.path == "/status":
                    headers = {}
                    if "retry_after" in query:
                        headers["Retry-After"] = query["retry_after"]
                    self._send(int(query["code"]), b"status body\n", headers)
                elif url.path == "/big":
                    size = int(query["size"])
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    block = bytes(range(256)) * 256
                    sent = 0
                    while sent < size:
                        part = block[: min(len(block), size - sent)]
                        self.wfile.write(part)
                        sent += len(part)
                elif url.path == "/chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (b"one,", b"two,", b"three"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                elif url.path == "/hang":
                    upstream.stopping.wait(30)
                    self.close_connection = True
                elif url.path == "/garbage":
                    self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
                    self.close_connection = True
                else:
                    self._send(404, b"no\n")

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hitsOf(self, path: str, key: str = "") -> int:
        with self.lock:
            return self.hits.get(path + ":" + key, 0)

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def amb(tmp_path_factory, upstream):
    """One ambassador for the module, with a route per situation (startup costs ~2 s)."""
    tmp = tmp_path_factory.mktemp("http")
    ports = {name: freePort() for name in (
        "api", "failover", "dead", "breaker", "budget", "timeout", "deadline", "small", "trace",
        "hostname", "tiny", "deadbudget")}
    dead = freePort()
    up = f"tcp:127.0.0.1:{upstream.port}"
    config = f"""
[defaults]
connect_timeout = "1s"
timeout = "2s"
deadline = "5s"

[defaults.retry]
backoff_base = "10ms"
backoff_max = "50ms"

[defaults.breaker]
failure_threshold = 1000

[[route]]
name = "api"
protocol = "http"
listen = "tcp:{ports['api']}"
upstreams = ["{up}"]

[[route]]
name = "failover"
protocol = "http"
listen = "tcp:{ports['failover']}"
upstreams = ["tcp:127.0.0.1:{dead}", "{up}"]

[[route]]
name = "dead"
protocol = "http"
listen = "tcp:{ports['dead']}"
upstreams = ["tcp:127.0.0.1:{dead}"]

[[route]]
name = "breaker"
protocol = "http"
listen = "tcp:{ports['breaker']}"
upstreams = ["{up}"]
[route.retry]
attempts = 1
[route.breaker]
failure_threshold = 2
reset_timeout = "60s"

[[route]]
name = "budget"
protocol = "http"
listen = "tcp:{ports['budget']}"
upstreams = ["{up}"]
[route.retry]
attempts = 3
budget_ratio = 0.1
budget_min_per_second = 0.1

[[route]]
name = "timeout"
protocol = "http"
listen = "tcp:{ports['timeout']}"
upstreams = ["{up}"]
timeout = "300ms"
[route.retry]
attempts = 1

[[route]]
name = "deadline"
protocol = "http"
listen = "tcp:{ports['deadline']}"
upstreams = ["{up}"]
timeout = "2s"
deadline = "600ms"

[[route]]
name = "small"
protocol = "http"
listen = "tcp:{ports['small']}"
upstreams = ["{up}"]
max_connections = 1
header_timeout = "1s"
idle_timeout = "3s"

[[route]]
name = "trace"
protocol = "http"
listen = "tcp:{ports['trace']}"
upstreams = ["tcp:127.0.0.1:{dead}", "{up}"]
trace = true
host_header = "api.example"

[[route]]
name = "deadbudget"
protocol = "http"
listen = "tcp:{ports['deadbudget']}"
upstreams = ["tcp:127.0.0.1:{dead}"]
[route.retry]
attempts = 3
budget_ratio = 0.0
budget_min_per_second = 0.1

[[route]]
name = "tiny"
protocol = "http"
listen = "tcp:{ports['tiny']}"
upstreams = ["{up}"]
max_retry_body = 10

[[route]]
name = "hostname"
protocol = "http"
listen = "tcp:{ports['hostname']}"
upstreams = ["tcp:localhost:{upstream.port}"]
"""
    ambassador = Ambassador(tmp, config=config)
    ambassador.ports = ports
    yield ambassador
    ambassador.stop()


def _client(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def _get(port: int, path: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    c = _client(port)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r, data


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the ambassador closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _headers(r: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in r.getheaders()}


# --- forwarding ---------------------------------------------------------------------


def test_get_post_put_forwarded_exactly_with_hop_by_hop_dropped(amb, upstream):
    before = upstream.connections
    c = _client(amb.ports["api"])
    for method, body in (("GET", None), ("POST", b"post body \x00\xff"), ("PUT", b"x" * 5000),
                         ("DELETE", None), ("PATCH", b"{}")):
        c.request(method, "/echo?a=1&b=%20two", body=body, headers={
            "X-Custom": "v1", "Connection": "keep-alive, X-Secret", "X-Secret": "s",
            "Keep-Alive": "300", "Proxy-Authorization": "p", "TE": "trailers",
            "Upgrade": "h2c",
        })
        r = c.getresponse()
        answer = json.loads(r.read())
        assert r.status == 200
        assert answer["method"] == method
        assert answer["path"] == "/echo?a=1&b=%20two"
        assert answer["body"] == (body or b"").decode("latin-1")
        sent = {k.lower(): v for k, v in answer["headers"]}
        assert sent["x-custom"] == "v1"
        assert sent["host"] == f"127.0.0.1:{upstream.port}"
        for hop in ("x-secret", "keep-alive", "proxy-authorization", "te", "upgrade", "connection"):
            assert hop not in sent
        headers = _headers(r)
        assert headers["x-ambassador-attempts"] == "1"
        assert headers["x-upstream"] == "yes"
        assert "x-hop" not in headers and "keep-alive" not in headers
    c.close()
    assert upstream.connections == before + 1


def test_head_request_gets_headers_without_body(amb):
    r, data = _get(amb.ports["api"], "/echo", method="HEAD")
    assert r.status == 200 and data == b""
    assert int(r.getheader("Content-Length")) > 0
    r, data = _get(amb.ports["api"], "/echo")  # the pooled connection still works
    assert r.status == 200 and json.loads(data)["method"] == "GET"


def test_chunked_request_body_and_chunked_response(amb):
    def parts():
        yield b"first-"
        yield b"second-"
        yield b"third"

    c = _client(amb.ports["api"])
    c.request("POST", "/echo", body=parts(), encode_chunked=True,
              headers={"Transfer-Encoding": "chunked"})
    r = c.getresponse()
    assert json.loads(r.read())["body"] == "first-second-third"
    c.request("GET", "/chunked")
    r = c.getresponse()
    assert r.read() == b"one,two,three"
    assert r.getheader("Transfer-Encoding") == "chunked"
    c.close()


def test_host_header_option_and_member_host(amb, upstream):
    r, data = _get(amb.ports["trace"], "/echo")
    sent = {k.lower(): v for k, v in json.loads(data)["headers"]}
    assert sent["host"] == "api.example"
    r, data = _get(amb.ports["hostname"], "/echo", headers={"Host": "app.local"})
    sent = {k.lower(): v for k, v in json.loads(data)["headers"]}
    assert sent["host"] == f"localhost:{upstream.port}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_post_with_expect_continue(amb):
    body = b"z" * 2_000_000  # curl sends Expect: 100-continue for big bodies
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "20", "-H", "Expect: 100-continue",
         "--data-binary", "@-", f"http://127.0.0.1:{amb.ports['api']}/echo"],
        input=body, capture_output=True, timeout=30, check=True,
    ).stdout
    head, _, payload = out.rpartition(b"\r\n\r\n")
    assert b"200 OK" in head and b"x-ambassador-attempts: 1" in head.lower()
    assert len(json.loads(payload)["body"]) == len(body)


def test_big_response_streams_intact_with_bounded_memory(amb):
    size = 20 * 1024 * 1024
    pid = amb.process.pid

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    before = rss()
    with socket.create_connection(("127.0.0.1", amb.ports["api"]), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        received = bytearray()
        peak = before
        deadline = time.monotonic() + 60
        # A slow reader first: the upstream must be slowed down, not buffered.
        for _ in range(20):
            received += s.recv(16384)
            time.sleep(0.05)
        peak = max(peak, rss())
        while time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += chunk
            head, sep, body = bytes(received[:4096]).partition(b"\r\n\r\n")
            if len(received) >= size + len(head) + 4:
                break
        peak = max(peak, rss())
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"content-length: %d" % size in head.lower()
    assert len(body) == size
    block = bytes(range(256)) * 256
    assert body[:len(block)] == block and body[-1000:] == (block * 400)[size - 1000:size]
    assert peak - before < 8 * 1024 * 1024, (before, peak)


def test_thousand_keepalive_requests_use_a_handful_of_member_connections(amb, upstream):
    before = upstream.connections
    c = _client(amb.ports["api"])
    for i in range(1000):
        c.request("GET", "/status?code=200&key=ka")
        r = c.getresponse()
        r.read()
        assert r.status == 200
    c.close()
    assert upstream.hitsOf("/status", "ka") == 1000
    assert upstream.connections - before <= 3


# --- retries ------------------------------------------------------------------------


def test_flaky_503_hidden_from_get(amb, upstream):
    r, data = _get(amb.ports["api"], "/flaky?key=g503&fail=2")
    assert r.status == 200 and data == b"fine 3\n"
    assert r.getheader("x-ambassador-attempts") == "3"
    assert upstream.hitsOf("/flaky", "g503") == 3


def test_flaky_reset_hidden_from_get(amb, upstream):
    # A reset on a reused connection with no answer at all may be redone at once on a
    # fresh one (a stale keep-alive connection); the second reset is a failed attempt.
    r, data = _get(amb.ports["api"], "/flaky?key=greset&fail=2&how=reset")
    assert r.status == 200 and data == b"fine 3\n"
    assert r.getheader("x-ambassador-attempts") in ("2", "3")
    assert upstream.hitsOf("/flaky", "greset") == 3


def test_post_not_replayed_after_reset(amb, upstream):
    r, data = _get(amb.ports["api"], "/flaky?key=preset&fail=1&how=reset", method="POST", body=b"once")
    assert r.status == 502
    assert r.getheader("x-ambassador-error") == "reset"
    assert r.getheader("x-ambassador-attempts") == "1"
    assert upstream.hitsOf("/flaky", "preset") == 1


def test_post_retried_after_connect_failure(amb, upstream):
    r, data = _get(amb.ports["failover"], "/echo?key=pcf", method="POST", body=b"payload")
    assert r.status == 200 and json.loads(data)["body"] == "payload"
    # round robin: the dead member may come first or second; a retry is never wasted
    assert r.getheader("x-ambassador-attempts") in ("1", "2")
    r2, data = _get(amb.ports["failover"], "/echo?key=pcf", method="POST", body=b"payload")
    assert r2.status == 200
    assert "2" in {r.getheader("x-ambassador-attempts"), r2.getheader("x-ambassador-attempts")}
    assert upstream.hitsOf("/echo", "pcf") == 2


def test_retryable_status_on_last_try_is_returned_as_is(amb, upstream):
    r, data = _get(amb.ports["api"], "/flaky?key=last&fail=10")
    assert r.status == 503 and data == b"busy\n"
    assert r.getheader("x-ambassador-attempts") == "3"
    assert r.getheader("x-ambassador-error") is None
    assert upstream.hitsOf("/flaky", "last") == 3


def test_retry_after_waited_when_it_fits_in_the_deadline(amb, upstream):
    started = time.monotonic()
    r, data = _get(amb.ports["api"], "/flaky?key=ra1&fail=1&retry_after=1")
    assert r.status == 200 and upstream.hitsOf("/flaky", "ra1") == 2
    assert time.monotonic() - started >= 0.9


def test_retry_after_beyond_the_deadline_returns_the_answer_at_once(amb, upstream):
    r, data = _get(amb.ports["api"], "/flaky?key=ra100&fail=1&retry_after=100")
    assert r.status == 503 and data == b"busy\n"
    assert upstream.hitsOf("/flaky", "ra100") == 1


def test_trace_header_lists_every_attempt(amb):
    for _ in range(2):  # round robin: one of the two starts with the dead member
        r, data = _get(amb.ports["trace"], "/echo?key=tr")
        assert r.status == 200
        trace = r.getheader("x-ambassador-trace")
        entries = trace.split(",")
        assert len(entries) == int(r.getheader("x-ambassador-attempts"))
        if len(entries) == 2:
            break
    assert len(entries) == 2, trace
    assert "connect-failure" in entries[0] and entries[1].strip().startswith("2 ")


def test_post_body_over_max_retry_body_is_not_replayed(amb, upstream):
    # tiny route: max_retry_body = 10 bytes; a 503 answer is then final for a PUT.
    r, data = _get(amb.ports["tiny"], "/flaky?key=bigput&fail=1", method="PUT", body=b"y" * 100)
    assert r.status == 503
    assert upstream.hitsOf("/flaky", "bigput") == 1
    r, data = _get(amb.ports["tiny"], "/flaky?key=smallput&fail=1", method="PUT", body=b"y" * 5)
    assert r.status == 200 and upstream.hitsOf("/flaky", "smallput") == 2
    # the same for a chunked body whose size is only known as it streams
    c = _client(amb.ports["tiny"])
    c.request("PUT", "/flaky?key=chunkput&fail=1", body=iter([b"a" * 8, b"b" * 8]),
              encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 503 and upstream.hitsOf("/flaky", "chunkput") == 1


# --- the ambassador's own failures (SPEC table) --------------------------------------


def test_refused_port_is_502_connect_failure(amb):
    r, data = _get(amb.ports["dead"], "/echo")
    assert r.status == 502
    assert r.getheader("x-ambassador-error") == "connect-failure"
    assert r.getheader("x-ambassador-attempts") == "3"
    assert data == b"ambassador: connect-failure\n"


def test_hang_is_504_timeout(amb, upstream):
    r, data = _get(amb.ports["timeout"], "/hang?key=t1")
    assert r.status == 504 and r.getheader("x-ambassador-error") == "timeout"


def test_hang_past_the_deadline_is_504_deadline(amb, upstream):
    started = time.monotonic()
    r, data = _get(amb.ports["deadline"], "/hang?key=d1")
    assert r.status == 504 and r.getheader("x-ambassador-error") == "deadline"
    assert time.monotonic() - started < 0.6 + 2


def test_garbage_from_upstream_is_502_protocol_error(amb):
    r, data = _get(amb.ports["api"], "/garbage")
    assert r.status == 502 and r.getheader("x-ambassador-error") == "protocol-error"


def test_breaker_open_answers_without_touching_the_network(amb, upstream):
    for _ in range(2):
        r, _ = _get(amb.ports["breaker"], "/status?code=502&key=brk")
        assert r.status == 502
    assert upstream.hitsOf("/status", "brk") == 2
    for _ in range(5):
        r, data = _get(amb.ports["breaker"], "/status?code=502&key=brk")
        assert r.status == 503
        assert r.getheader("x-ambassador-error") == "breaker-open"
        assert r.getheader("x-ambassador-attempts") == "0"
    assert upstream.hitsOf("/status", "brk") == 2


def test_sustained_failure_stays_within_the_retry_budget(amb, upstream):
    # budget route: ratio 0.1, min 0.1/s -> about 1 + 0.1 * requests retries in 10 s.
    requests = 40
    exhausted = 0
    for _ in range(requests):
        r, _ = _get(amb.ports["budget"], "/status?code=503&key=bud")
        assert r.status == 503
        exhausted += r.getheader("x-ambassador-error") == "budget-exhausted"
    retries = upstream.hitsOf("/status", "bud") - requests
    assert 0 < retries <= 1 + 0.1 * requests + 1
    assert exhausted > 0


def test_budget_exhausted_without_a_response_is_503(amb):
    # deadbudget route: a refusing member and room for one retry per 10 s window
    answers = [_get(amb.ports["deadbudget"], "/echo")[0] for _ in range(3)]
    reasons = [r.getheader("x-ambassador-error") for r in answers]
    assert reasons[-1] == "budget-exhausted" and answers[-1].status == 503
    assert answers[-1].getheader("x-ambassador-attempts") == "1"
    assert all(r.status in (502, 503) for r in answers)


def test_overloaded_over_max_connections(amb):
    with socket.create_connection(("127.0.0.1", amb.ports["small"]), timeout=5) as first:
        first.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 200")
        answer = _raw(amb.ports["small"], b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"x-ambassador-error: overloaded" in answer
        assert b"x-ambassador-attempts: 0" in answer


# --- bad clients ----------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /echo?key=smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /echo?key=smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
     b"Content-Length: 5\r\n\r\nabcde", 400),
    (b"GET /echo?key=smuggle HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /echo?key=smuggle HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /echo?key=smuggle HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(700)) + b"\r\n", 431),
    (b"GET /echo?key=smuggle HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
     b"Connection: upgrade\r\n\r\n", 501),
])
def test_bad_requests_never_reach_a_member(amb, upstream, request_bytes, status):
    answer = _raw(amb.ports["api"], request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
    assert b"x-ambassador-attempts: 0" in answer
    if status == 501:
        assert b"x-ambassador-error: unsupported" in answer
    assert upstream.hitsOf("/echo", "smuggle") == 0


def test_slowloris_gets_408_after_header_timeout(amb, upstream):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", amb.ports["small"]), timeout=10) as s:
        s.sendall(b"GET /echo?key=slow HTTP/1.1\r\n")
        answer = b""
        try:
            for _ in range(8):
                s.sendall(b"X-A: b\r\n")
                time.sleep(0.25)
        except OSError:
            pass
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 1 + 3
    assert upstream.hitsOf("/echo", "slow") == 0


def test_silent_connection_closed_after_idle_timeout_without_answer(amb):
    started = time.monotonic()
    answer = _raw(amb.ports["small"], b"", wait=8)
    assert answer == b""
    assert 2.5 < time.monotonic() - started < 3 + 3


def test_access_log_line_per_request(amb):
    r, _ = _get(amb.ports["api"], "/status?code=201&key=log")
    assert r.status == 201
    amb.waitForLog(r"access#info\] api .* status=201")
    lines = [l for l in amb.accessLines() if l["route"] == "api" and l.get("status") == "201"]
    assert lines and lines[-1]["result"] == "ok" and lines[-1]["attempts"] == "1"


def test_big_upload_streams_intact(amb):
    import hashlib

    body = bytes(range(256)) * (20 * 4096)  # 20 MiB, over max_retry_body: streamed, not kept
    c = _client(amb.ports["api"])
    c.request("POST", "/sink", body=body)
    r = c.getresponse()
    assert r.read() == b"%d %s" % (len(body), hashlib.md5(body).hexdigest().encode())
    c.close()


def test_pipelined_requests_answered_in_order(amb):
    with socket.create_connection(("127.0.0.1", amb.ports["api"]), timeout=5) as s:
        s.sendall(b"GET /status?code=201 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /status?code=202 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /status?code=203 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"201", b"202", b"203"]


def test_http10_client_gets_a_close_delimited_answer(amb):
    answer = _raw(amb.ports["api"], b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert body == b"one,two,three"


def test_sigterm_closes_idle_keepalive_connections_and_finishes_requests_in_flight(tmp_path, upstream):
    listen = freePort()
    config = f"""
[defaults]
drain_timeout = "20s"

[[route]]
name = "drain"
protocol = "http"
listen = "tcp:{listen}"
upstreams = ["tcp:127.0.0.1:{upstream.port}"]
"""
    amb = Ambassador(tmp_path, config=config)
    try:
        idle = _client(listen)
        idle.request("GET", "/status?code=200")
        idle.getresponse().read()  # now an idle keep-alive connection
        busy = socket.create_connection(("127.0.0.1", listen), timeout=10)
        busy.sendall(b"GET /big?size=3000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = busy.recv(1000)  # the answer is under way, the app reads slowly
        started = time.monotonic()
        amb.signal(signal.SIGTERM)
        received = len(first)
        time.sleep(0.5)
        while True:
            chunk = busy.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        busy.close()
        assert received > 3_000_000  # the response in flight completed
        assert amb.wait(15) == 0
        assert time.monotonic() - started < 10  # not the 20 s drain_timeout
    finally:
        amb.stop()


def test_tls_member_verified_and_a_wrong_ca_is_502_tls_error(tmp_path):
    import ssl

    import trustme

    ca, otherCA = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    otherCA.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    port = freePort()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = self.headers.get("Host", "").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    good, bad = freePort(), freePort()
    config = f"""
[[route]]
name = "good"
protocol = "http"
listen = "tcp:{good}"
upstreams = ["tcp:localhost:{port}"]
[route.tls]
trust_roots = "{tmp_path / 'ca.pem'}"

[[route]]
name = "bad"
protocol = "http"
listen = "tcp:{bad}"
upstreams = ["tcp:localhost:{port}"]
[route.tls]
trust_roots = "{tmp_path / 'other.pem'}"
[route.retry]
attempts = 1
"""
    try:
        with Ambassador(tmp_path, config=config):
            r, data = _get(good, "/")
            assert r.status == 200
            assert data == f"localhost:{port}".encode()  # the member's host, port kept (not 443)
            r, data = _get(bad, "/")
            assert r.status == 502 and r.getheader("x-ambassador-error") == "tls-error"
    finally:
        server.shutdown()
        server.server_close()


def test_unix_socket_member_and_listener(tmp_path):
    import socketserver

    path = str(tmp_path / "member.sock")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def address_string(self) -> str:
            return "unix"

        def do_GET(self) -> None:
            body = self.headers.get("Host", "").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listen = str(tmp_path / "app.sock")
    try:
        with Ambassador(tmp_path, routes=[f"http unix:{listen} unix:{path}"]):
            for _ in range(3):  # keep-alive on both unix sockets
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(listen)
                    s.sendall(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nlocalhost")
    finally:
        server.shutdown()
        server.server_close()


def test_a_reader_that_stops_is_closed_after_idle_timeout(amb):
    # small route: idle_timeout 3 s; back-pressure stalls count as idle (SPEC §4/http)
    with socket.create_connection(("127.0.0.1", amb.ports["small"]), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        s.sendall(b"GET /big?size=20000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(4.5)  # read nothing: the ambassador's buffers fill, then nothing moves
        received = 0
        closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(1 << 20)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += len(chunk)
        assert closed and received < 20_000_000
