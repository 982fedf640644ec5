"""SPEC §6 across the three shipped protocols, from outside the real twistd: /metrics
after http, tcp and line traffic, the trace header of a request that needed two
retries (and /status?route= showing it), and json access lines with the http status."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness import Ambassador, freePort
from peers import Peer, echoServer
from test_admin_e2e import SPEC_FAMILIES, echoThrough, get, metrics, samples, total, waitFor


class FlakyHandler(BaseHTTPRequestHandler):
    """``/flaky`` answers 503 twice, then 200; anything else is 200 at once."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    flakyCalls = 0

    def do_GET(self) -> None:
        status = 200
        if self.path == "/flaky":
            with FlakyHandler.lock:
                FlakyHandler.flakyCalls += 1
                if FlakyHandler.flakyCalls <= 2:
                    status = 503
        body = b"fine\n" if status == 200 else b"busy\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the ambassador closing its pooled connections at exit is no error


def httpMember() -> ThreadingHTTPServer:
    server = QuietHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    return server


def _lineEcho(peer: Peer, conn: socket.socket) -> None:
    with conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"ECHO " + line)


def rawHTTP(port: int, path: str) -> tuple[bytes, bytes]:
    """One GET with Connection: close; returns what was sent and everything received."""
    request = f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        chunks = []
        while data := c.recv(65536):
            chunks.append(data)
    return request, b"".join(chunks)


def headers(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


def test_metrics_trace_and_json_access_lines_for_http_tcp_and_line(tmp_path) -> None:
    FlakyHandler.flakyCalls = 0
    web, pipe, lines, admin = freePort(), freePort(), freePort(), freePort()
    http = httpMember()
    httpAddress = f"tcp:127.0.0.1:{http.server_address[1]}"
    with echoServer() as echo, Peer(_lineEcho) as lineMember:
        config = f"""
[defaults.retry]
attempts = 3
backoff_base = "1ms"
backoff_max = "2ms"

[[route]]
name = "web"
protocol = "http"
listen = "tcp:{web}"
upstreams = ["{httpAddress}"]
trace = true

[[route]]
name = "pipe"
protocol = "tcp"
listen = "tcp:{pipe}"
upstreams = ["{echo.address}"]


[[route]]
name = "lines"
protocol = "line"
dialect = "line"
listen = "tcp:{lines}"
upstreams = ["{lineMember.address}"]
"""
        amb = Ambassador(tmp_path, config=config,
                         args=["--admin", f"tcp:{admin}", "--log-format", "json"])
        try:
            sentHTTP, receivedHTTP = [], []
            for path in ("/flaky", "/ok"):
                request, response = rawHTTP(web, path)
                sentHTTP.append(request)
                receivedHTTP.append(response)
            flaky = headers(receivedHTTP[0])
            assert receivedHTTP[0].startswith(b"HTTP/1.1 200")
            assert flaky["x-ambassador-attempts"] == "3"
            entries = [e.strip().split() for e in flaky["x-ambassador-trace"].split(",")]
            assert [e[0] for e in entries] == ["1", "2", "3"]
            assert [e[1] for e in entries] == [httpAddress] * 3
            assert [e[2] for e in entries] == ["503", "503", "ok"]
            for entry in entries:
                assert entry[3].endswith("ms") and entry[4].startswith("wait=")
                assert entry[5].startswith("left=") and entry[5].endswith("ms")
            assert entries[0][4] == "wait=0ms"
            assert "x-ambassador-trace" in headers(receivedHTTP[1])

            payload = b"through the pipe" * 100
            assert echoThrough(pipe, payload) == payload

            lineRequests = [b"one\n", b"two\n", b"three\n"]
            replies = b""
            with socket.create_connection(("127.0.0.1", lines), timeout=10) as c:
                c.sendall(b"".join(lineRequests))
                while replies.count(b"\n") < 3:
                    data = c.recv(65536)
                    assert data, replies
                    replies += data
            assert replies == b"ECHO one\nECHO two\nECHO three\n"
            routes = {"web": 2, "pipe": 1, "lines": 3}

            def scraped() -> Any:
                m = metrics(admin)
                done = all(
                    total(m, "ambassador_requests", route=r) == n
                    for r, n in routes.items()
                )
                return m if done else None

            families = waitFor(scraped, what="every request in /metrics")
            traces = json.loads(get(admin, "/status?route=web")[1])["routes"][0]["traces"]
            assert traces[0] == flaky["x-ambassador-trace"]
        finally:
            assert amb.stop() == 0
            http.shutdown()
            http.server_close()

    for name, (kind, labels) in SPEC_FAMILIES.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
        if "route" in labels:
            assert {s.labels["route"] for s in family.samples} == set(routes), name

    expected = {
        # route: requests, attempts, bytes towards members, bytes to the app
        "web": (2, 4, sum(map(len, sentHTTP)), sum(map(len, receivedHTTP))),
        "pipe": (1, 1, len(payload), len(payload)),
        "lines": (3, 3, sum(map(len, lineRequests)), len(replies)),
    }
    for route, (requests, attempts, up, down) in expected.items():
        assert total(families, "ambassador_requests", route=route, result="ok") == requests
        assert total(families, "ambassador_attempts", route=route) == attempts, route
        assert total(families, "ambassador_retries", route=route) == attempts - requests
        assert total(families, "ambassador_bytes", route=route, direction="upstream") == up, route
        assert total(families, "ambassador_bytes", route=route,
                     direction="downstream") == down, route
        assert total(families, "ambassador_request_duration_seconds", "_count",
                     route=route) == requests
    assert total(families, "ambassador_attempts", route="web", result="503") == 2
    assert [s.value for s in samples(families, "ambassador_breaker_state")] == [0] * len(routes)

    objects = [json.loads(line) for line in amb.log().splitlines()]
    access = [o for o in objects if "attempts" in o]
    byRoute: dict[str, list[dict[str, Any]]] = {}
    for line in access:
        assert set(line) == {"route", "upstream", "attempts", "result", "status", "bytes_in",
                             "bytes_out", "duration_ms"}
        byRoute.setdefault(line["route"], []).append(line)
    assert [(a["attempts"], a["status"], a["result"]) for a in byRoute["web"]] == [
        (3, 200, "ok"), (1, 200, "ok")
    ]
    assert [a["bytes_in"] for a in byRoute["web"]] == [len(r) for r in sentHTTP]
    assert [a["bytes_out"] for a in byRoute["web"]] == [len(r) for r in receivedHTTP]
    assert len(byRoute["lines"]) == 3
    assert len(byRoute["pipe"]) == 1
    assert byRoute["pipe"][0]["status"] is None


def test_http_bytes_count_exactly_what_the_app_sent(tmp_path) -> None:
    """SPEC §6: bytes_in is what was received from the app, http headers included;
    ambassador_bytes_total{direction="upstream"} adds them up."""
    web, admin = freePort(), freePort()
    http = httpMember()
    try:
        member = f"tcp:127.0.0.1:{http.server_address[1]}"
        with Ambassador(tmp_path, routes=[f"http tcp:{web} {member}"],
                        args=["--admin", f"tcp:{admin}", "--log-format", "json"]) as amb:
            exchanges = [rawHTTP(web, path) for path in ("/a", "/longer/path?query=1")]
            families = waitFor(
                lambda: (m := metrics(admin)) and total(m, "ambassador_requests") == 2 and m,
                what="2 requests in /metrics",
            )
            amb.waitForLog(r'"attempts"', count=2)
        access = [o for o in map(json.loads, amb.log().splitlines()) if "attempts" in o]
        assert [(a["bytes_in"], a["bytes_out"]) for a in access] == [
            (len(sent), len(received)) for sent, received in exchanges
        ]
        assert total(families, "ambassador_bytes", direction="upstream") == sum(
            len(sent) for sent, _ in exchanges
        )
        assert total(families, "ambassador_bytes", direction="downstream") == sum(
            len(received) for _, received in exchanges
        )
    finally:
        http.shutdown()
        http.server_close()
