"""SIGTERM/SIGINT drain (SPEC §7), seen from outside: the real twistd, real sockets."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from harness import Ambassador, freePort
from test_reload import (
    DEFAULTS,
    EchoMember,
    SlowMember,
    exchange,
    refused,
    reload,
    route,
)


def exchangeOrCut(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Like ``exchange``, with a connection reset (the drain bound's abort) as b""."""
    try:
        return exchange(port, payload, timeout)
    except ConnectionResetError:
        return b""


def readyStatus(admin: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_slow_request_in_flight_completes_ready_turns_503_and_the_exit_is_0(tmp_path, sig):
    slow = SlowMember(delay=2.0)
    listen, admin = freePort(), freePort()
    try:
        amb = Ambassador(tmp_path, config=DEFAULTS + route("r", listen, slow.port),
                         args=["--admin", f"tcp:{admin}"])
        assert readyStatus(admin) == 200
        results: list[bytes] = []
        inFlight = threading.Thread(target=lambda: results.append(exchange(listen, b"slow")))
        inFlight.start()
        slow.waitForRequests(1)
        amb.signal(sig)
        amb.waitForLog(r"route r: draining 1 connections")
        assert refused(listen), "still accepting while draining"
        assert readyStatus(admin) == 503
        inFlight.join(10)
        assert results == [b"SLOW"]
        assert amb.wait(20) == 0
    finally:
        slow.close()
        amb.stop()


def test_a_request_slower_than_drain_timeout_is_closed_and_the_process_exits_by_the_bound(tmp_path):
    slow = SlowMember(delay=30.0)
    listen = freePort()
    config = DEFAULTS.replace('drain_timeout = "10s"', 'drain_timeout = "1s"')
    try:
        amb = Ambassador(tmp_path, config=config + route("r", listen, slow.port))
        results: list[bytes] = []
        inFlight = threading.Thread(target=lambda: results.append(exchangeOrCut(listen, b"slow")))
        inFlight.start()
        slow.waitForRequests(1)
        signalled = time.monotonic()
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 0
        # the bound: drain_timeout plus the drain's polling and twistd's own shutdown
        assert time.monotonic() - signalled < 1.0 + 5.0
        inFlight.join(5)
        assert results == [b""], "the connection was not closed at the drain bound"
    finally:
        slow.close()


def test_the_largest_drain_timeout_wins(tmp_path):
    slow = SlowMember(delay=2.5)
    short, long = freePort(), freePort()
    config = (DEFAULTS.replace('drain_timeout = "10s"', 'drain_timeout = "1s"')
              + route("short", short, slow.port)
              + route("long", long, slow.port, extra='drain_timeout = "10s"'))
    try:
        amb = Ambassador(tmp_path, config=config)
        results: dict[str, bytes] = {}
        threads = [threading.Thread(target=lambda p=p, n=n: results.__setitem__(n, exchangeOrCut(p, n.encode())))
                   for n, p in (("short", short), ("long", long))]
        for t in threads:
            t.start()
        slow.waitForRequests(2)
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 0
        for t in threads:
            t.join(5)
        assert results == {"short": b"", "long": b"LONG"}
    finally:
        slow.close()


def test_sigterm_also_waits_for_a_route_that_a_reload_removed(tmp_path):
    slow = SlowMember(delay=2.0)
    a, b = freePort(), freePort()
    try:
        amb = Ambassador(tmp_path, config=DEFAULTS + route("a", a, slow.port) + route("b", b, slow.port))
        results: list[bytes] = []
        inFlight = threading.Thread(target=lambda: results.append(exchange(b, b"slow")))
        inFlight.start()
        slow.waitForRequests(1)
        reload(amb, DEFAULTS + route("a", a, slow.port), 1)
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 0
        inFlight.join(5)
        assert results == [b"SLOW"]
        assert "route b (removed): old settings retired" in amb.log()
    finally:
        slow.close()


def test_sigterm_drains_connections_left_on_a_changed_route_old_settings_by_the_bound(tmp_path):
    echo = EchoMember()
    listen = freePort()
    config = DEFAULTS.replace('drain_timeout = "10s"', 'drain_timeout = "1s"') + route(
        "r", listen, echo.port, extra="[route.retry]\nattempts = {n}\n")
    try:
        amb = Ambassador(tmp_path, config=config.format(n=2))
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as c:
            c.sendall(b"open")
            assert c.recv(100) == b"OPEN"
            reload(amb, config.format(n=3), 1)
            signalled = time.monotonic()
            amb.signal(signal.SIGTERM)
            assert amb.wait(20) == 0
            assert time.monotonic() - signalled < 1.0 + 5.0
            try:
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass  # closed at the bound: a reset is as good as an end
        assert "route r (changed): old settings retired" in amb.log()
    finally:
        echo.close()
        amb.stop()
