"""Real TCP peers for end-to-end tests: the members (and odd members) a route talks to.

Each peer listens on 127.0.0.1 on a free port and serves every connection in a
daemon thread.  Everything is bounded: sockets carry timeouts, the accept loop polls
a stop flag, and ``stop()`` closes every socket it opened, so a test that fails
half-way never leaves a thread blocked forever.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from typing import Self

#: How long a peer's connection may wait for a byte before giving up.
PEER_TIMEOUT = 30.0


class Peer:
    """A listening socket whose connections are each handled by ``serve(conn)``.

    @ivar port: the port it listens on (127.0.0.1).
    @ivar received: per connection, what ``serve`` chose to record (bytes, digests).
    """

    def __init__(
        self, serve: Callable[[Peer, socket.socket], None], receiveBuffer: int | None = None,
    ) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        if receiveBuffer is not None:
            # accepted sockets inherit it, before the window is advertised
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.address = f"tcp:127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.received: list[object] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._acceptLoop, daemon=True)
        self.thread.start()

    def _acceptLoop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(PEER_TIMEOUT)
            with self.lock:
                self.accepted += 1
                self.connections.append(conn)
            threading.Thread(target=self._serveOne, args=(conn,), daemon=True).start()

    def _serveOne(self, conn: socket.socket) -> None:
        try:
            self.serve(self, conn)
        except OSError:
            pass  # the ambassador (or stop()) closed it: the test judges what arrived

    def record(self, value: object) -> None:
        with self.lock:
            self.received.append(value)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.close()
            except OSError:
                pass
        self.thread.join(2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _echo(peer: Peer, conn: socket.socket) -> None:
    """Echo every byte as it comes; pass the app's half-close back, then close."""
    while True:
        data = conn.recv(256 * 1024)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    conn.close()


def echoServer() -> Peer:
    return Peer(_echo)


def _replyAtEnd(peer: Peer, conn: socket.socket) -> None:
    """Read until the app half-closes, then answer with everything upper-cased."""
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            break
        chunks.append(data)
    request = b"".join(chunks)
    peer.record(request)
    conn.sendall(request.upper() + b"\nsha256=" + hashlib.sha256(request).hexdigest().encode())
    conn.close()


def replyAtEndServer() -> Peer:
    """A member that answers only once it has seen the app's end of stream."""
    return Peer(_replyAtEnd)


def _greetThenListen(peer: Peer, conn: socket.socket) -> None:
    """Half-close first (after a greeting), then keep reading what the app sends."""
    conn.sendall(b"greetings, then EOF from the member")
    conn.shutdown(socket.SHUT_WR)
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            break
        chunks.append(data)
    peer.record(b"".join(chunks))
    conn.close()


def greetThenListenServer() -> Peer:
    return Peer(_greetThenListen)


def _neverRead(peer: Peer, conn: socket.socket) -> None:
    """Hold the connection open, reading nothing, until stop()."""
    peer.stopping.wait(PEER_TIMEOUT)


def sinkServer() -> Peer:
    """A member that accepts and never reads: the relay must push back."""
    return Peer(_neverRead, receiveBuffer=64 * 1024)


def _closeAtOnce(peer: Peer, conn: socket.socket) -> None:
    conn.close()


def closingServer() -> Peer:
    """A member that accepts and closes at once."""
    return Peer(_closeAtOnce)


class Blackhole:
    """A port whose connection attempts hang: a listener with a full accept queue.

    Linux drops SYNs to a listener whose backlog is full, so ``connect()`` to it
    neither succeeds nor fails until the client gives up: a member that is down in
    the worst way, without any traffic leaving 127.0.0.1.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.address = f"tcp:127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)

    def stop(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def refusingAddress() -> str:
    """A member endpoint on a port where nothing listens (connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp:127.0.0.1:{port}"
