"""SIGHUP reload, seen from outside: the real twistd, real sockets (SPEC §7)."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import urllib.request

import pytest
from harness import Ambassador, freePort


class SlowMember:
    """A member that answers each connection's first read, upper-cased, after ``delay``
    seconds, then closes: a slow request in flight on a tcp route."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.stopped = False
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = conn.recv(1000)
                self.requests += 1
                time.sleep(self.delay)
                conn.sendall(data.upper())
            except OSError:
                pass

    def waitForRequests(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.requests < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.requests} requests reached the member, not {n}")
            time.sleep(0.02)

    def close(self) -> None:
        self.stopped = True
        self.server.close()
        self.thread.join(2)


def exchange(port: int, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """Send ``payload`` through a route and read until the member closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(payload)
        chunks = []
        while True:
            chunk = c.recv(1000)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def route(name: str, listen: int, *members: int, extra: str = "") -> str:
    upstreams = ", ".join(f'"tcp:127.0.0.1:{m}"' for m in members)
    return (f'[[route]]\nname = "{name}"\nprotocol = "tcp"\nlisten = "tcp:{listen}"\n'
            f"upstreams = [{upstreams}]\n{extra}\n")


DEFAULTS = '[defaults]\ndrain_timeout = "10s"\n\n[defaults.breaker]\nfailure_threshold = 100\n\n'


def reload(amb: Ambassador, config: str, count: int, pattern: str = r"reload: done") -> None:
    """Write the new config, SIGHUP, and wait for the ``count``-th outcome line."""
    assert amb.configPath is not None
    amb.configPath.write_text(config)
    amb.signal(signal.SIGHUP)
    amb.waitForLog(pattern, count=count)


@pytest.fixture
def member():
    m = SlowMember()
    yield m
    m.close()


def test_sighup_adds_a_route_that_then_listens(tmp_path, member):
    a, b = freePort(), freePort()
    with Ambassador(tmp_path, config=DEFAULTS + route("a", a, member.port)) as amb:
        assert refused(b)
        reload(amb, DEFAULTS + route("a", a, member.port) + route("b", b, member.port), 1)
        assert exchange(b, b"new") == b"NEW"
        assert exchange(a, b"old") == b"OLD"
        assert "added: b" in amb.log()
    assert amb.process.returncode == 0


def test_sighup_removing_a_route_stops_accepting_while_its_slow_connection_completes(tmp_path):
    slow = SlowMember(delay=2.0)
    a, b = freePort(), freePort()
    try:
        with Ambassador(tmp_path, config=DEFAULTS + route("a", a, slow.port) + route("b", b, slow.port)) as amb:
            results: list[bytes] = []
            inFlight = threading.Thread(target=lambda: results.append(exchange(b, b"slow")))
            inFlight.start()
            slow.waitForRequests(1)
            reload(amb, DEFAULTS + route("a", a, slow.port), 1)
            assert refused(b), "the removed route still accepts connections"
            inFlight.join(10)
            assert results == [b"SLOW"], "the connection in flight on the removed route was cut"
            amb.waitForLog(r"route b \(removed\): old settings retired")
            assert exchange(a, b"still") == b"STILL"
    finally:
        slow.close()


def test_sighup_changing_retry_attempts_applies_to_new_connections(tmp_path):
    dead = [freePort() for _ in range(4)]
    listen = freePort()
    config = DEFAULTS + route("r", listen, *dead, extra="[route.retry]\nattempts = {n}\nbackoff_base = \"1ms\"\nbackoff_max = \"1ms\"\n")
    with Ambassador(tmp_path, config=config.format(n=2)) as amb:
        assert exchange(listen) == b""
        amb.waitForLog(r"access#info\] r ", count=1)
        reload(amb, config.format(n=4), 1)
        assert exchange(listen) == b""
        amb.waitForLog(r"access#info\] r ", count=2)
        attempts = [line["attempts"] for line in amb.accessLines()]
        assert attempts == ["2", "4"]
        assert "changed: r" in amb.log()


def reloadsCounted(admin: int) -> dict[str, float]:
    """``ambassador_config_reloads_total`` by result, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        match = re.match(r'ambassador_config_reloads_total\{result="(\w+)"\} (\S+)', line)
        if match:
            counts[match[1]] = float(match[2])
    return counts


def test_an_invalid_config_on_sighup_is_logged_counted_and_the_old_routes_keep_serving(
    tmp_path, member
):
    a, admin = freePort(), freePort()
    good = DEFAULTS + route("a", a, member.port)
    with Ambassador(tmp_path, config=good, args=["--admin", f"tcp:{admin}"]) as amb:
        bad = good.replace('protocol = "tcp"', 'protocol = "tcp"\nretries = 3').replace(
            'drain_timeout = "10s"', 'drain_timeout = "-1s"')
        reload(amb, bad, 1, pattern=r"the configuration is refused \(\d+ errors\)")
        log = amb.log()
        assert 'key "retries"' in log and "drain_timeout" in log
        assert exchange(a, b"kept") == b"KEPT"
        assert reloadsCounted(admin) == {"ok": 0.0, "error": 1.0}
        # and a later good file is applied as usual
        reload(amb, good + route("b", freePort(), member.port), 1)
        assert reloadsCounted(admin) == {"ok": 1.0, "error": 1.0}
    assert amb.process.returncode == 0


def test_a_listen_endpoint_that_cannot_bind_fails_the_whole_reload(tmp_path, member):
    a, b = freePort(), freePort()
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        busy = taken.getsockname()[1]
        with Ambassador(tmp_path, config=DEFAULTS + route("a", a, member.port) + route("b", b, member.port)) as amb:
            # removes b, adds c (binds) and d (port in use): nothing of it may happen
            new = DEFAULTS + route("a", a, member.port) + route("c", freePort(), member.port) + route("d", busy, member.port)
            reload(amb, new, 1, pattern=r"cannot listen on .*nothing changed")
            assert exchange(b, b"b") == b"B", "route b was removed although the reload failed"
            assert exchange(a, b"a") == b"A"
            c = int(new.split('name = "c"')[1].split("tcp:")[1].split('"')[0])
            assert refused(c), "route c kept listening although the reload failed"
    finally:
        taken.close()


def test_a_load_running_across_three_reloads_sees_no_failed_request(tmp_path, member):
    a, b = freePort(), freePort()
    configs = [
        DEFAULTS + route("a", a, member.port),
        DEFAULTS + route("a", a, member.port, extra='idle_timeout = "1m"') + route("b", b, member.port),
        DEFAULTS + route("a", a, member.port, extra="[route.retry]\nattempts = 5"),
        DEFAULTS + route("a", a, member.port),
    ]
    with Ambassador(tmp_path, config=configs[0]) as amb:
        stop = threading.Event()
        outcomes: list[bool] = []

        def load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                payload = b"req%d" % n
                try:
                    outcomes.append(exchange(a, payload, timeout=5) == payload.upper())
                except OSError:
                    outcomes.append(False)

        generator = threading.Thread(target=load)
        generator.start()
        try:
            for i, config in enumerate(configs[1:], 1):
                time.sleep(0.3)
                reload(amb, config, i)
            time.sleep(0.3)
        finally:
            stop.set()
            generator.join(10)
        assert len(outcomes) > 10
        assert outcomes.count(False) == 0, f"{outcomes.count(False)} of {len(outcomes)} failed"


class EchoMember:
    """A member that echoes, upper-cased, everything on a connection until it closes."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(1000):
                    conn.sendall(data.upper())
            except OSError:
                pass

    def close(self) -> None:
        self.stopped = True
        self.server.close()
        self.thread.join(2)


def test_a_settings_change_cuts_no_open_connection_even_past_drain_timeout(tmp_path):
    echo = EchoMember()
    listen = freePort()
    config = DEFAULTS.replace('drain_timeout = "10s"', 'drain_timeout = "1s"') + route(
        "r", listen, echo.port, extra="[route.retry]\nattempts = {n}\n")
    try:
        with Ambassador(tmp_path, config=config.format(n=2)) as amb:
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as c:
                c.sendall(b"before")
                assert c.recv(100) == b"BEFORE"
                reload(amb, config.format(n=3), 1)
                amb.waitForLog(r"stay on the old settings until they close")
                time.sleep(1.5)  # longer than drain_timeout
                c.sendall(b"after")
                assert c.recv(100) == b"AFTER"
                with socket.create_connection(("127.0.0.1", listen), timeout=5) as fresh:
                    fresh.sendall(b"new")  # a new connection, on the new settings
                    assert fresh.recv(100) == b"NEW"
            amb.waitForLog(r"route r \(changed\): old settings retired")
        assert amb.process.returncode == 0
    finally:
        echo.close()
