#!/usr/bin/env python3
"""TLS rows: a plain app -> ambassador (tcp route, ``[route.tls]``) -> TLS member,
against a TLS client talking to the same member directly.

Why: with TLS towards members the ambassador pays the handshake and the record
crypto the app would otherwise pay; this shows what that costs per new connection
(handshakes/s) and per byte (throughput), side by side on one machine.

Workloads (each bounded in seconds and bytes; the median of ``--repeat`` runs):

- ``handshakes``: ``--clients`` threads, each in a loop: connect, 1-byte round trip,
  close.  Direct: one TLS handshake per connection in the client; through the
  ambassador: a plain connection from the app and one TLS handshake ambassador ->
  member per connection.
- ``stream``: one connection sends ``--bytes`` (8-byte length first) to a sink
  member that answers with the count it read.

The member is a separate Python process (``ssl`` module, a thread per connection);
certificates come from trustme.  Timings are printed, never asserted.

    python bench/tls_relay.py            # about a minute
    python bench/tls_relay.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ports import freePort, waitForPort

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
CHUNK = 256 * 1024

MEMBER = r'''
import socket, ssl, struct, sys, threading
certfile, keyfile, mode, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(certfile, keyfile)
listener = socket.create_server(("127.0.0.1", port), backlog=512)

def readExactly(conn, n):
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(n - len(data), 262144))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)

def serve(raw):
    try:
        conn = context.wrap_socket(raw, server_side=True)
        if mode == "echo":
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        else:
            size = struct.unpack("!Q", readExactly(conn, 8))[0]
            seen = 0
            while seen < size:
                chunk = conn.recv(262144)
                if not chunk:
                    break
                seen += len(chunk)
            conn.sendall(struct.pack("!Q", seen))
        conn.close()
    except (OSError, EOFError, ssl.SSLError):
        raw.close()

print("ready", flush=True)
while True:
    raw, _ = listener.accept()
    threading.Thread(target=serve, args=(raw,), daemon=True).start()
'''


class Target:
    """How to open a connection for one path (direct TLS, or plain to the route)."""

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        self.port = port
        self.context = context

    def open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            return self.context.wrap_socket(sock, server_hostname="localhost")
        return sock


def handshakes(path: Target, clients: int, seconds: float) -> float:
    """New connections per second, each with a 1-byte round trip."""
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            with path.open() as sock:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise RuntimeError("bad echo")
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return sum(counts) / (time.monotonic() - started)


def stream(path: Target, size: int) -> float:
    """Bytes per second of one stream, delivery confirmed by the member."""
    payload = b"\0" * CHUNK
    with path.open() as sock:
        started = time.monotonic()
        sock.sendall(struct.pack("!Q", size))
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            sock.sendall(payload[:n])
            sent += n
        seen = b""
        while len(seen) < 8:
            chunk = sock.recv(8 - len(seen))
            if not chunk:
                raise RuntimeError("the sink closed early")
            seen += chunk
        elapsed = time.monotonic() - started
    if struct.unpack("!Q", seen)[0] != size:
        raise RuntimeError("the sink saw a different byte count")
    return size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--bytes", type=int, default=512 * 1024 * 1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.bytes, args.repeat = 1.5, 64 * 1024 * 1024, 1

    import trustme

    children: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp / "member.pem"))
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        (tmp / "member.py").write_text(MEMBER)
        ports = {"echo": freePort(), "sink": freePort()}
        for mode, port in ports.items():
            children.append(subprocess.Popen(
                [sys.executable, str(tmp / "member.py"), str(tmp / "member.pem"), str(tmp / "member.pem"),
                 mode, str(port)], stdout=subprocess.DEVNULL,
            ))
            waitForPort(port)
        routes = {"echo": freePort(), "sink": freePort()}
        config = "".join(
            f'[[route]]\nname = "{mode}"\nprotocol = "tcp"\nlisten = "tcp:{routes[mode]}"\n'
            f'upstreams = ["tcp:127.0.0.1:{ports[mode]}"]\naccess_log = false\n'
            f'max_connections = 4096\n[route.tls]\ntrust_roots = "{tmp / "ca.pem"}"\n'
            'server_name = "localhost"\n'
            for mode in ("echo", "sink")
        )
        (tmp / "ambassador.toml").write_text(config)
        with open(tmp / "ambassador.log", "wb") as log:  # the child keeps its own copy
            children.append(subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "ambassador", "--config", str(tmp / "ambassador.toml"),
                 "--admin", "none"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
            ))
        for port in routes.values():
            waitForPort(port)

        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(client)
        direct = {mode: Target(port, client) for mode, port in ports.items()}
        via = {mode: Target(port, None) for mode, port in routes.items()}

        print(f"# TLS member, {args.clients} client threads, {args.seconds:g} s per run, "
              f"{args.bytes // (1024 * 1024)} MiB streams, median of {args.repeat}; "
              f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        rows = []
        for name, run, unit, scale in [
            ("handshakes", lambda p: handshakes(p["echo"], args.clients, args.seconds), "conn/s", 1.0),
            ("stream", lambda p: stream(p["sink"], args.bytes), "MiB/s", 1 / (1024 * 1024)),
        ]:
            d = statistics.median(run(direct) for _ in range(args.repeat)) * scale
            a = statistics.median(run(via) for _ in range(args.repeat)) * scale
            rows.append((name, d, a, unit))
        print(f"{'workload':<12} {'direct TLS':>14} {'via ambassador':>16} {'ratio':>7}")
        for name, d, a, unit in rows:
            print(f"{name:<12} {d:>10.1f} {unit:<4}{a:>12.1f} {unit:<4}{a / d:>6.2f}x")
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


if __name__ == "__main__":
    main()
