"""Real ``redis-server`` and ``memcached`` members for end-to-end tests of line routes.

Each runs as a child process on a free 127.0.0.1 port, waited for with a bound, and
is killed (and reaped) in ``stop()``; tests skip with a clear reason when the binary
is not installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from harness import freePort, waitForPort


def requireBinary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name.split('-')[0]})")
    return path


class Server:
    """A member process on a free port."""

    def __init__(self, command: list[str], port: int) -> None:
        self.command = command
        self.port = port
        self.address = f"tcp:127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            waitForPort(self.port, timeout=10)
        except TimeoutError:
            self.stop()
            raise

    def kill(self) -> None:
        """Die at once (SIGKILL): connections are reset, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redisServer(port: int | None = None) -> Server:
    binary = requireBinary("redis-server")
    port = port or freePort()
    return Server([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no"], port)


def memcachedServer(port: int | None = None) -> Server:
    binary = requireBinary("memcached")
    port = port or freePort()
    return Server([binary, "-p", str(port), "-U", "0", "-l", "127.0.0.1", "-u", "root"], port)


class RawClient:
    """A bare socket client: sends bytes, reads until a predicate is met, bounded."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readUntil(self, done, timeout: float = 10.0) -> bytes:  # type: ignore[no-untyped-def]
        """Read until ``done(buffer)`` is true; return (and drop) the buffer."""
        deadline = time.monotonic() + timeout
        while not done(self.buffer):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only got {self.buffer[:200]!r}")
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self.buffer += data
        data, self.buffer = self.buffer, b""
        return data

    def readExactly(self, n: int, timeout: float = 10.0) -> bytes:
        data = self.readUntil(lambda b: len(b) >= n, timeout)
        self.buffer = data[n:]
        return data[:n]

    def closedByPeer(self, timeout: float = 5.0) -> bool:
        """Does the peer close the connection (after whatever is buffered)?"""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.buffer += data
        return False

    def close(self) -> None:
        self.sock.close()
