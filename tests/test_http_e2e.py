"""The http route from outside (SPEC §4/http): the real twistd, a real HTTP upstream
(``http.server`` in a thread), real clients (``http.client``, raw sockets, curl).

The upstream's behaviour is chosen per request by its path, and it counts what it
sees (hits per path, connections), so tests can check what reached a member.
"""

from __future__ import annotations

import http.client
import json
import shutil
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


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


def _config(listen: int, upstreams: list[str], extra: str = "", route: str = "") -> str:
    members = ", ".join(f'"{u}"' for u in upstreams)
    return f"""
[defaults]
connect_timeout = "1s"
timeout = "2s"
deadline = "5s"
{extra}

[defaults.retry]
backoff_base = "10ms"
backoff_max = "50ms"

[[route]]
name = "api"
protocol = "http"
listen = "tcp:{listen}"
upstreams = [{members}]
{route}
"""


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


def test_get_post_put_forwarded_exactly_with_hop_by_hop_dropped(tmp_path, upstream):
    listen = freePort()
    with Ambassador(tmp_path, config=_config(listen, [f"tcp:127.0.0.1:{upstream.port}"])):
        c = _client(listen)
        for method, body in (("GET", None), ("POST", b"post body \x00\xff"), ("PUT", b"x" * 5000)):
            c.request(method, "/echo?a=1&b=%20two", body=body, headers={
                "X-Custom": "v1", "Connection": "keep-alive, X-Secret", "X-Secret": "s",
                "Keep-Alive": "300", "Proxy-Authorization": "p", "TE": "trailers",
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
            for hop in ("x-secret", "keep-alive", "proxy-authorization", "te"):
                assert hop not in sent
            assert r.getheader("x-ambassador-attempts") == "1"
            assert r.getheader("X-Upstream") == "yes"
            assert r.getheader("X-Hop") is None and r.getheader("Keep-Alive") is None
        c.close()
        assert upstream.connections == 1


def test_chunked_request_body_and_chunked_response(tmp_path, upstream):
    listen = freePort()
    with Ambassador(tmp_path, config=_config(listen, [f"tcp:127.0.0.1:{upstream.port}"])):
        def parts():
            yield b"first-"
            yield b"second-"
            yield b"third"

        c = _client(listen)
        c.request("POST", "/echo", body=parts(), encode_chunked=True,
                  headers={"Transfer-Encoding": "chunked"})
        r = c.getresponse()
        assert json.loads(r.read())["body"] == "first-second-third"
        c.request("GET", "/chunked")
        r = c.getresponse()
        assert r.read() == b"one,two,three"
        assert r.getheader("Transfer-Encoding") == "chunked"
        c.close()


def test_host_header_option(tmp_path, upstream):
    listen = freePort()
    config = _config(listen, [f"tcp:127.0.0.1:{upstream.port}"], route='host_header = "api.example"')
    with Ambassador(tmp_path, config=config):
        r, data = _get(listen, "/echo")
        sent = {k.lower(): v for k, v in json.loads(data)["headers"]}
        assert sent["host"] == "api.example"
