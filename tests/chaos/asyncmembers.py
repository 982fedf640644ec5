"""Real members for the chaos tests that hold thousands of connections at once.

``tests/peers.py`` serves each connection in a thread: fine for a few, not for the
1,000+ member connections of an overload test.  These members run in a CHILD
PROCESS on one asyncio loop, so pytest's process holds no thread or reactor of
theirs, and each listens on 127.0.0.1 on a port of its own:

=========  ===========================================================================
``echo``   every byte back as it comes; the app's half-close is passed back (FIN)
``digest`` reads until the app half-closes, then answers ``SIZE SHA256HEX\\n`` and closes
``http``   HTTP/1.1 keep-alive: ``200`` with body ``member PATH`` for each request
``line``   one line back per line: ``OK LINE\\r\\n``
=========  ===========================================================================

The child dies with its parent (PR_SET_PDEATHSIG, and end of file on its stdin) and
on ``stop()``.  Run as a script it is the child: it prints one JSON line of ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Self

KINDS = ("echo", "digest", "http", "line")


class Members:
    """The child process and its ports (``members.port["echo"]`` ...)."""

    def __init__(self, timeout: float = 10.0) -> None:
        import selectors

        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.stop()
                raise TimeoutError(f"members did not start within {timeout}s")
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise AssertionError(f"members exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
        self.port: dict[str, int] = json.loads(line)
        self.address = {kind: f"tcp:127.0.0.1:{port}" for kind, port in self.port.items()}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the child ------------------------------------------------------------------------


def _child() -> None:
    import asyncio
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    class Member(asyncio.Protocol):
        transport: Any

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def pause_writing(self) -> None:
            self.transport.pause_reading()  # back-pressure: a slow app slows us

        def resume_writing(self) -> None:
            self.transport.resume_reading()

    class Echo(Member):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def eof_received(self) -> bool:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            return True  # keep it until the ambassador closes its side too

    class Digest(Member):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.hash = hashlib.sha256()
            self.size = 0

        def data_received(self, data: bytes) -> None:
            self.hash.update(data)
            self.size += len(data)

        def eof_received(self) -> bool:
            self.transport.write(b"%d %s\n" % (self.size, self.hash.hexdigest().encode()))
            return False  # close once written

    class HTTP(Member):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buffer[:end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                path = head.split(" ", 2)[1].encode("latin-1")
                body = b"member " + path
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    class Line(Member):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\n")
            if lines:
                self.transport.write(b"".join(b"OK %s\r\n" % line.rstrip(b"\r") for line in lines))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ports = {}
        for kind, protocol in zip(KINDS, (Echo, Digest, HTTP, Line)):
            server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=4096)
            ports[kind] = server.sockets[0].getsockname()[1]
        sys.stdout.write(json.dumps(ports) + "\n")
        sys.stdout.flush()
        gone = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or gone.set())
        await gone.wait()

    asyncio.run(main())


if __name__ == "__main__":
    _child()
