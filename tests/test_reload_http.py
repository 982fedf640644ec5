"""Reloads under http load: the http route (keep-alive towards the app, pooled member
connections) across SIGHUPs that change it, add and remove members and routes."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import Ambassador, freePort
from test_reload import DEFAULTS, reload


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"{self.server.server_port} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the ambassador closing pooled member connections is no error here


class HTTPMember:
    def __init__(self) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def httpRoute(name: str, listen: int, *members: int, extra: str = "") -> str:
    upstreams = ", ".join(f'"tcp:127.0.0.1:{m}"' for m in members)
    return (f'[[route]]\nname = "{name}"\nprotocol = "http"\nlisten = "tcp:{listen}"\n'
            f"upstreams = [{upstreams}]\n{extra}\n")


class KeepAliveClient:
    """One persistent connection, re-opened when the server closed it.

    Like browsers, Go's net/http and urllib3, it sends a request again on a new
    connection when a *reused* connection turns out to be closed before any byte of
    the answer came back (the server closed it while idle: nothing was processed).
    Those re-sends are counted apart from failures.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None
        self.resent = 0

    def get(self, path: str) -> tuple[int, bytes]:
        reused = self.connection is not None
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            self.connection.request("GET", path)
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.connection.close()
            self.connection = None
            if not reused:
                raise
            self.resent += 1
            return self.get(path)
        body = response.read()
        if response.getheader("connection", "").lower() == "close":
            self.connection.close()
            self.connection = None
        return response.status, body


def test_http_load_across_three_reloads_sees_no_failed_request(tmp_path):
    members = [HTTPMember() for _ in range(3)]
    a, b = freePort(), freePort()
    p = [m.port for m in members]
    configs = [
        DEFAULTS + httpRoute("api", a, p[0], p[1]),
        DEFAULTS + httpRoute("api", a, p[0], p[1], p[2], extra="[route.retry]\nattempts = 4")
        + httpRoute("other", b, p[2]),
        DEFAULTS + httpRoute("api", a, p[1], p[2], extra='timeout = "3s"'),
        DEFAULTS + httpRoute("api", a, p[2]),
    ]
    stop = threading.Event()
    outcomes: dict[str, list[bool]] = {"new": [], "keepalive": []}
    clients: list[KeepAliveClient] = []

    def newConnections() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                connection = http.client.HTTPConnection("127.0.0.1", a, timeout=10)
                connection.request("GET", f"/new/{n}")
                response = connection.getresponse()
                ok = response.status == 200 and response.read().endswith(f"/new/{n}".encode())
                connection.close()
            except OSError:
                ok = False
            outcomes["new"].append(ok)

    def keepAlive() -> None:
        client = KeepAliveClient(a)
        clients.append(client)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status, body = client.get(f"/ka/{n}")
                ok = status == 200 and body.endswith(f"/ka/{n}".encode())
            except OSError:
                ok = False
            outcomes["keepalive"].append(ok)

    try:
        with Ambassador(tmp_path, config=configs[0]) as amb:
            generators = [threading.Thread(target=newConnections), threading.Thread(target=keepAlive)]
            for generator in generators:
                generator.start()
            try:
                for i, config in enumerate(configs[1:], 1):
                    time.sleep(0.4)
                    reload(amb, config, i)
                time.sleep(0.4)
            finally:
                stop.set()
                for generator in generators:
                    generator.join(15)
            for kind, results in outcomes.items():
                assert len(results) > 10, kind
                assert results.count(False) == 0, f"{kind}: {results.count(False)} of {len(results)} failed"
            assert amb.log().count("reload: done") == 3
            # each reload closes the old keep-alive connection once, at most
            assert clients[0].resent <= 3
    finally:
        for member in members:
            member.close()
