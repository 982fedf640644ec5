"""The fault proxy itself, seen from a real socket client against a real echo member.

The chaos scenarios trust these modes to do what they say; each test here watches one
mode from the app's side of a real connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Self

import pytest
from accounting import waitUntil
from chaos.faultproxy import FaultProxy
from peers import Peer, echoServer


@pytest.fixture
def echo():
    with echoServer() as peer:
        yield peer


@pytest.fixture(scope="module")
def _shared() -> Iterator[tuple[Peer, FaultProxy]]:
    """One echo member and one proxy for the tests that can share them (start-up costs)."""
    with echoServer() as peer, FaultProxy(target=("127.0.0.1", peer.port), seed=1) as fp:
        yield peer, fp


class Fresh:
    """The shared proxy, back to ``pass`` with nothing open, counting from now on."""

    def __init__(self, echo: Peer, fp: FaultProxy) -> None:
        self.echo, self.fp = echo, fp
        fp.set("pass", kill=True)
        waitUntil(lambda: fp.stats()["open"] == 0, 5)
        self.start = fp.stats()
        self.accepted = echo.accepted

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @property
    def port(self) -> int:
        return self.fp.port

    @property
    def echoAccepted(self) -> int:
        return self.echo.accepted - self.accepted

    def set(self, mode: str, **params: Any) -> None:
        self.fp.set(mode, **params)

    def schedule(self, *args: Any, **kwargs: Any) -> None:
        self.fp.schedule(*args, **kwargs)

    def killConnections(self) -> None:
        self.fp.killConnections()

    def stats(self) -> dict[str, Any]:
        """The counters since this test began (``open`` and ``mode`` as they are)."""
        now = self.fp.stats()
        faults = {mode: count - self.start["faults"].get(mode, 0) for mode, count in now["faults"].items()}
        return {**now, "faults": {mode: n for mode, n in faults.items() if n},
                **{k: now[k] - self.start[k] for k in ("connections", "bytesUp", "bytesDown")}}


@pytest.fixture
def proxy(_shared: tuple[Peer, FaultProxy]) -> Fresh:
    return Fresh(*_shared)


def connect(fp: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", fp.port), timeout=timeout)


def recvExactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recvUntilClosed(s: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything until EOF (error None) or a reset (the error)."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError as e:
            return data, e
        if not chunk:
            return data, None
        data += chunk


def test_passForwardsBothWaysAndCounts(proxy: Fresh) -> None:
    with proxy as fp:
        with connect(fp) as s:
            s.sendall(b"hello" * 1000)
            assert recvExactly(s, 5000) == b"hello" * 1000
            s.shutdown(socket.SHUT_WR)
            assert recvUntilClosed(s) == (b"", None)  # the member's FIN comes through
        stats = waitUntil(lambda: (st := fp.stats())["open"] == 0 and st, 5)
        assert stats["connections"] == 1
        assert stats["bytesUp"] == 5000 and stats["bytesDown"] == 5000
        assert stats["faults"] == {}
        assert stats["mode"] == "pass"


def test_resetBeforeResponseIsAnRst(proxy: Fresh) -> None:
    with proxy as fp:
        fp.set("reset_before_response")
        with connect(fp) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            data, error = recvUntilClosed(s)
        assert data == b""
        assert isinstance(error, ConnectionResetError)
        stats = fp.stats()
        assert stats["faults"] == {"reset_before_response": 1}
        assert stats["bytesUp"] == 0 and stats["bytesDown"] == 0
        assert fp.echoAccepted == 0  # never reached the member


def _recordThenAnswer(peer: Peer, conn: socket.socket) -> None:
    data = conn.recv(65536)
    peer.record(data)
    conn.sendall(b"done:" + data)
    conn.recv(1)


def test_resetBeforeResponseForwardedReachesTheMember() -> None:
    with Peer(_recordThenAnswer) as member, FaultProxy(target=("127.0.0.1", member.port)) as fp:
        fp.set("reset_before_response", forward=True)
        with connect(fp) as s:
            s.sendall(b"POST /pay")
            data, error = recvUntilClosed(s)
        assert data == b"" and isinstance(error, ConnectionResetError)
        waitUntil(lambda: member.received, 5)
        assert member.received == [b"POST /pay"]  # the member did the work; the app never heard


def test_resetMidResponseForwardsAfterBytesThenRsts(proxy: Fresh) -> None:
    with proxy as fp:
        fp.set("reset_mid_response", after=100)
        with connect(fp) as s:
            s.sendall(bytes(range(256)) * 40)
            data, error = recvUntilClosed(s)
        assert data == (bytes(range(256)) * 40)[:100]
        assert isinstance(error, ConnectionResetError)
        assert fp.stats()["faults"] == {"reset_mid_response": 1}


def test_blackholeNeverAnswersNorCloses(proxy: Fresh) -> None:
    with proxy as fp:
        fp.set("blackhole")
        with connect(fp, timeout=1.0) as s:
            s.sendall(b"anyone there?")
            with pytest.raises(TimeoutError):
                s.recv(1)
            s.sendall(b"still there?")  # not closed either
        assert fp.echoAccepted == 0
        assert fp.stats()["faults"] == {"blackhole": 1}


def test_acceptCloseIsAFin(proxy: Fresh) -> None:
    with proxy as fp:
        fp.set("accept_close")
        with connect(fp) as s:
            assert recvUntilClosed(s) == (b"", None)
        assert fp.stats()["faults"] == {"accept_close": 1}


def test_throttleBoundsTheRate(proxy: Fresh) -> None:
    rate, total = 100_000, 150_000
    with proxy as fp:
        fp.set("throttle", bytesPerSecond=rate)
        with connect(fp, timeout=10) as s:
            started = time.monotonic()
            s.sendall(b"x" * total)
            assert recvExactly(s, total) == b"x" * total
            elapsed = time.monotonic() - started
    # a burst of at most 5 ticks (5% of a second) may go at once; the rest is metered
    assert elapsed >= (total - rate * 0.05) / rate * 0.9


def test_latencyAppliesAtOnceToOpenConnections(proxy: Fresh) -> None:
    with proxy as fp, connect(fp) as s:
        s.sendall(b"a")
        assert recvExactly(s, 1) == b"a"
        fp.set("latency", ms=400)  # the already open connection slows down too
        started = time.monotonic()
        for chunk in (b"1", b"2", b"3"):
            s.sendall(chunk)
        assert recvExactly(s, 3) == b"123"  # order kept
        assert time.monotonic() - started >= 0.78  # 400 ms each way
        fp.set("pass")
        started = time.monotonic()
        s.sendall(b"b")
        assert recvExactly(s, 1) == b"b"
        assert time.monotonic() - started < 0.7  # no 800 ms round trip any more


def test_scheduleFlipsModes(proxy: Fresh) -> None:
    with proxy as fp:
        fp.schedule([(0.3, "pass", {}), (0.3, "accept_close", {})], repeat=True)
        seen = set()
        deadline = time.monotonic() + 5
        while seen != {"echo", "closed"} and time.monotonic() < deadline:
            with connect(fp) as s:
                try:
                    s.sendall(b"ping")
                    seen.add("echo" if recvUntilClosedOrEcho(s) else "closed")
                except OSError:
                    seen.add("closed")
            time.sleep(0.05)
        assert seen == {"echo", "closed"}
        assert fp.stats()["faults"]["accept_close"] >= 1
        fp.set("pass")  # set cancels the schedule
        time.sleep(0.7)
        assert fp.stats()["mode"] == "pass"


def recvUntilClosedOrEcho(s: socket.socket) -> bool:
    try:
        return s.recv(4) == b"ping"
    except OSError:
        return False


def test_scheduleWithoutRepeatStaysOnItsLastStep(proxy: Fresh) -> None:
    with proxy as fp:
        fp.schedule([(0.1, "blackhole", {}), (0.1, "latency", {"ms": 5})], repeat=False)
        waitUntil(lambda: fp.stats()["mode"] == "latency", 3)
        time.sleep(0.3)
        assert fp.stats()["mode"] == "latency"


def _randomOutcomes(port: int, seed: int, count: int) -> tuple[list[str], dict]:
    with FaultProxy(target=("127.0.0.1", port), seed=seed) as fp:
        fp.set("random", p=0.5, modes=["accept_close", "reset_before_response"])
        outcomes = []
        for _ in range(count):
            with connect(fp) as s:
                try:
                    s.sendall(b"ping")
                    data = s.recv(4)
                    outcomes.append("echo" if data == b"ping" else "fin")
                except ConnectionResetError:
                    outcomes.append("rst")
                except OSError:
                    outcomes.append("fin")
        return outcomes, fp.stats()


def test_randomIsSeededPerConnection(echo: Peer) -> None:
    first, stats = _randomOutcomes(echo.port, 11, 30)
    again, _ = _randomOutcomes(echo.port, 11, 30)
    assert first == again  # the same seed, the same faults
    assert stats["connections"] == 30
    faults = stats["faults"]
    assert faults.get("accept_close", 0) + faults.get("reset_before_response", 0) == 30 - first.count("echo")
    assert faults.get("reset_before_response", 0) == first.count("rst")
    assert 0 < first.count("echo") < 30


def test_killConnectionsResetsOpenConnections(proxy: Fresh) -> None:
    with proxy as fp:
        with connect(fp) as a, connect(fp) as b:
            for s in (a, b):
                s.sendall(b"x")
                assert recvExactly(s, 1) == b"x"
            assert fp.stats()["open"] == 2
            fp.killConnections()
            for s in (a, b):
                _, error = recvUntilClosed(s)
                assert isinstance(error, ConnectionResetError)
        waitUntil(lambda: fp.stats()["open"] == 0, 5)


def test_badModeIsRefused(proxy: Fresh) -> None:
    with proxy as fp:
        with pytest.raises(ValueError):
            fp.set("explode")
        with pytest.raises(ValueError):
            fp.set("latency", seconds=3)
        with pytest.raises(ValueError):
            fp.schedule([(1.0, "pass", {}), (0, "blackhole", {})])
        assert fp.stats()["mode"] == "pass"


def test_memberDownClosesTheAppConnection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        deadPort = s.getsockname()[1]
    with FaultProxy(target=("127.0.0.1", deadPort)) as fp, connect(fp) as c:
        c.sendall(b"x")
        data, _ = recvUntilClosed(c)
        assert data == b""


def test_childDiesWithItsParent(echo: Peer) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    script = (
        f"import sys, os; sys.path.insert(0, {os.path.dirname(here)!r});"
        "from chaos.faultproxy import FaultProxy;"
        f"fp = FaultProxy(target=('127.0.0.1', {echo.port}));"
        "print(fp.process.pid, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=20, check=True)
    child = int(out.stdout.split()[0])

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # a zombie (reparented to init, not yet reaped) counts as gone
        with open(f"/proc/{child}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")

    waitUntil(gone, 5)


def test_killOptionResetsOpenConnectionsAsTheModeTakesEffect(proxy: Fresh) -> None:
    with proxy as fp, connect(fp) as s:
        s.sendall(b"x")
        assert recvExactly(s, 1) == b"x"
        fp.schedule([(0.2, "blackhole", {"kill": True})], repeat=False)
        _, error = recvUntilClosed(s)
        assert isinstance(error, ConnectionResetError)
        with connect(fp, timeout=0.5) as t:
            t.sendall(b"y")
            with pytest.raises(TimeoutError):
                t.recv(1)  # and new connections get the mode
