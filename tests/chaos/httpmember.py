"""A real HTTP/1.1 member for the chaos tests, in a child process, that writes down every request.

The chaos tests must prove that no unsafe request was applied twice, and that every
answer the app got belongs to the request it sent.  So this member records each
request it *applies* (one line: method, ``x-request-id``, path) in a log file before it
answers, and every answer carries the id back (``x-request-id`` header, and a body
made of the id repeated, so a body mixed up with another request's shows).

Query parameters shape the answer: ``size=N`` (body bytes, default 64), ``ms=N``
(wait before answering).  Keep-alive is HTTP/1.1's default here, with Content-Length.

Run as a script it is the child; tests use :class:`HttpMember`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self


def expectedBody(requestId: str, size: int) -> bytes:
    """The body the member answers ``requestId`` with: the id and a dot, repeated to ``size``."""
    unit = requestId.encode() + b"."
    return (unit * (size // len(unit) + 1))[:size]


class HttpMember:
    """The member child process.

    @ivar port: where it listens on 127.0.0.1 (point a fault proxy at it).
    @ivar logPath: one ``METHOD ID PATH`` line per request applied.
    """

    def __init__(self, logPath: Path, startTimeout: float = 30.0) -> None:
        self.logPath = Path(logPath)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--log", str(self.logPath),
             "--parent", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + startTimeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                self.stop()
                raise TimeoutError("http member did not start")
            chunk = os.read(fd, 4096)
            if not chunk:
                self.stop()
                raise RuntimeError("http member exited before starting")
            data += chunk
        self.port: int = json.loads(data)["port"]

    def records(self) -> list[tuple[str, str, str]]:
        """Every request applied so far, as (method, id, path)."""
        if not self.logPath.exists():
            return []
        lines = self.logPath.read_text().splitlines()
        return [tuple(line.split(" ", 2)) for line in lines if line.count(" ") >= 2]  # type: ignore[misc]

    def applied(self) -> Counter[tuple[str, str]]:
        """How many times each (method, id) was applied."""
        return Counter((method, requestId) for method, requestId, _ in self.records())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _childMain(argv: list[str]) -> None:
    import argparse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    from faultproxy import _dieWithParent

    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--parent", type=int, default=0)
    options = parser.parse_args(argv)
    _dieWithParent(options.parent)

    log = open(options.log, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # an idle keep-alive connection's thread does not live forever

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            requestId = self.headers.get("x-request-id", "-")
            query = parse_qs(urlsplit(self.path).query)
            size = int(query.get("size", ["64"])[0])
            delay = int(query.get("ms", ["0"])[0])
            with lock:
                log.write(f"{self.command} {requestId} {self.path}\n")
            if delay:
                time.sleep(delay / 1000.0)
            body = expectedBody(requestId, size)
            self.send_response(200)
            self.send_header("x-request-id", requestId)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # connections reset by the fault proxies are the point, not news

    server = Server(("127.0.0.1", 0), Handler)
    sys.stdout.write(json.dumps({"port": server.server_address[1]}) + "\n")
    sys.stdout.flush()
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    _childMain(sys.argv[1:])
