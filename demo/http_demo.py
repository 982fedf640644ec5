"""The HTTP part of `make demo`: a flaky HTTP service, called directly and through an
http route of the ambassador.

Three members run on 127.0.0.1:19111-19113: the first is down (connections
refused); the second is flaky: of its requests, 25 % get a 503, 10 % a reset
connection and 5 % stall for 1.2 s; the third is healthy.  A client makes the same
GETs two ways (a 1 s timeout each): directly, round robin over the members, and
through the ambassador, which retries on other members (timeout 300 ms, deadline
2 s) and opens the breaker of the member that is down.
"""

from __future__ import annotations

import http.client
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from report import report

ROOT = Path(__file__).resolve().parent.parent
LISTEN = 19110
MEMBERS = [19111, 19112, 19113]
CALLS = 200

CONFIG = f"""
[defaults]
connect_timeout = "300ms"
timeout = "300ms"
deadline = "2s"

[defaults.retry]
attempts = 3
backoff_base = "10ms"
backoff_max = "100ms"

[defaults.breaker]
failure_threshold = 3
reset_timeout = "2s"

[[route]]
name = "flaky-http"
protocol = "http"
listen = "tcp:{LISTEN}"
upstreams = ["tcp:127.0.0.1:{MEMBERS[0]}", "tcp:127.0.0.1:{MEMBERS[1]}", "tcp:127.0.0.1:{MEMBERS[2]}"]
"""


def member(port: int, flaky: bool, rng: random.Random) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            roll = rng.random() if flaky else 1.0
            if roll < 0.10:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True
                return
            if roll < 0.15:
                time.sleep(1.2)
            code, body = (503, b"busy\n") if roll < 0.40 else (200, b"hello from %d\n" % port)
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # clients that left
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def call(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        c.close()
        return r.status == 200
    except (OSError, http.client.HTTPException):
        return False


def main() -> int:
    rng = random.Random(4)
    servers = [member(MEMBERS[1], True, rng), member(MEMBERS[2], False, rng)]
    print(f"\nflaky HTTP service: :{MEMBERS[0]} down, :{MEMBERS[1]} flaky (25% 503, 10% reset, "
          f"5% stall 1.2 s), :{MEMBERS[2]} healthy\n")
    print(f"1. {CALLS} GETs directly, round robin over the three members ...", flush=True)
    direct = sum(call(MEMBERS[i % 3]) for i in range(CALLS))

    tmp = Path(tempfile.mkdtemp(prefix="ambassador-demo-"))
    (tmp / "http.toml").write_text(CONFIG)
    logPath = tmp / "ambassador-http.log"
    log = open(logPath, "w+b")
    ambassador = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "ambassador", "--admin", "none", "--config", str(tmp / "http.toml")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
    )
    try:
        deadline = time.monotonic() + 15
        while b"listening on" not in logPath.read_bytes():
            if ambassador.poll() is not None or time.monotonic() > deadline:
                print(logPath.read_text())
                print("the ambassador did not start")
                return 1
            time.sleep(0.1)
        print(f"2. {CALLS} GETs through the ambassador on :{LISTEN} ...", flush=True)
        through = sum(call(LISTEN) for _ in range(CALLS))
    finally:
        ambassador.send_signal(signal.SIGTERM)
        try:
            ambassador.wait(15)
        except subprocess.TimeoutExpired:
            ambassador.kill()
        for server in servers:
            server.shutdown()
            server.server_close()

    text = logPath.read_text()
    report(text, direct, through, CALLS, "requests")
    print(f"full log: {logPath}")
    return 0 if through > direct else 1


if __name__ == "__main__":
    sys.exit(main())
