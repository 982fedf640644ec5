"""`make demo`: a flaky local service, called directly and through the ambassador.

Three members of a line-echo service run on 127.0.0.1:19101-19103: the first is
down (connections refused), the second flaps (listens 1.5 s, then refuses 1.5 s),
the third is healthy.  A client makes the same number of calls two ways:

- directly, picking members round robin itself, as an app without an ambassador would;
- through the ambassador (conf/demo.toml), which retries refused connections on
  another member and opens the breaker of a member that keeps failing.

It prints the success rate of both, and what the ambassador did (attempts per call,
breaker changes), then stops everything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from report import report

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "conf" / "demo.toml"
LISTEN = 19100
MEMBERS = [19101, 19102, 19103]
CALLS = 300
PACE = 0.02  # seconds between calls: ~6 s per run


class EchoMember(threading.Thread):
    """A line-echo server; ``flap`` makes it alternately listen and refuse."""

    def __init__(self, port: int, flap: float | None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.flap = flap
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            server = socket.create_server(("127.0.0.1", self.port))
            server.settimeout(0.1)
            upUntil = time.monotonic() + (self.flap or 1e9)
            while not self.stopping and time.monotonic() < upUntil:
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                threading.Thread(target=self.serve, args=(conn,), daemon=True).start()
            server.close()
            if self.flap:
                time.sleep(self.flap)  # down: connections are refused

    @staticmethod
    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"echo " + data)


def call(port: int) -> bool:
    """One call of the service: connect, send a line, read the echo."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
            c.sendall(b"hello\n")
            c.settimeout(3)
            reply = c.recv(4096)
            return reply == b"echo hello\n"
    except OSError:
        return False


def main() -> int:
    members = [EchoMember(MEMBERS[1], flap=1.5), EchoMember(MEMBERS[2], flap=None)]
    for m in members:
        m.start()
    time.sleep(0.3)

    print(f"flaky service: member :{MEMBERS[0]} down, :{MEMBERS[1]} flapping, :{MEMBERS[2]} healthy\n")
    print(f"1. {CALLS} calls directly, round robin over the three members ...")
    direct = 0
    for i in range(CALLS):
        direct += call(MEMBERS[i % 3])
        time.sleep(PACE)

    log = open(ROOT / "demo" / "ambassador.log", "w+b")
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    ambassador = subprocess.Popen(
        [*twistd, "-n", "--pidfile=", "ambassador", "--config", str(CONFIG)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 15
        while b"listening on" not in (ROOT / "demo" / "ambassador.log").read_bytes():
            if ambassador.poll() is not None or time.monotonic() > deadline:
                print((ROOT / "demo" / "ambassador.log").read_text())
                print("the ambassador did not start")
                return 1
            time.sleep(0.1)
        print(f"2. {CALLS} calls through the ambassador on :{LISTEN} ...")
        through = 0
        for i in range(CALLS):
            through += call(LISTEN)
            time.sleep(PACE)
    finally:
        ambassador.send_signal(signal.SIGTERM)
        try:
            ambassador.wait(15)
        except subprocess.TimeoutExpired:
            ambassador.kill()
        for m in members:
            m.stopping = True

    text = (ROOT / "demo" / "ambassador.log").read_text()
    report(text, direct, through, CALLS, "calls")
    print(f"\nexit status of the ambassador after SIGTERM: {ambassador.returncode}")
    print("full log: demo/ambassador.log")
    return 0 if through > direct else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    status = main()
    import http_demo  # the http route on its own ports: demo/http_demo.py

    sys.exit(status or http_demo.main())
