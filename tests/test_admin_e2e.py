"""The admin endpoint of the real twistd (SPEC §6): /metrics after real traffic,
/ready and ambassador_breaker_state following a member's death and return,
/status, and --log-format json read from the outside."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from harness import Ambassador, freePort
from peers import echoServer, refusingAddress
from prometheus_client.parser import text_string_to_metric_families

SPEC_FAMILIES = {
    # family name as the parser reports it (counters lose "_total") -> type, labels
    "ambassador_requests": ("counter", {"route", "result"}),
    "ambassador_attempts": ("counter", {"route", "upstream", "result"}),
    "ambassador_retries": ("counter", {"route"}),
    "ambassador_request_duration_seconds": ("histogram", {"route"}),
    "ambassador_breaker_state": ("gauge", {"route", "upstream"}),
    "ambassador_active_connections": ("gauge", {"route"}),
    "ambassador_bytes": ("counter", {"route", "direction"}),
    "ambassador_config_reloads": ("counter", {"result"}),
}


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(port: int) -> dict[str, Any]:
    """Every family of /metrics, parsed by prometheus_client's own parser."""
    status, body = get(port, "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> list[Any]:
    family = families[name]
    wanted = family.name + suffix
    return [
        s for s in family.samples
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(families: dict[str, Any], name: str, suffix: str = "_total", **labels: str) -> float:
    return sum(s.value for s in samples(families, name, suffix, **labels))


def waitFor(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout}s")
        time.sleep(0.05)


def echoThrough(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = c.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_metrics_after_tcp_traffic_have_every_spec_series(tmp_path) -> None:
    listen, admin = freePort(), freePort()
    dead = refusingAddress()
    with echoServer() as live:
        config = f"""
[defaults.retry]
attempts = 3
backoff_base = "1ms"
backoff_max = "5ms"

[[route]]
name = "echo"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["{dead}", "{live.address}"]
"""
        with Ambassador(tmp_path, config=config, args=["--admin", f"tcp:{admin}"]) as amb:
            payloads = [bytes([65 + i]) * (1000 + i) for i in range(6)]
            for payload in payloads:
                assert echoThrough(listen, payload) == payload
            families = waitFor(
                lambda: (m := metrics(admin)) and total(m, "ambassador_requests", route="echo") == 6 and m,
                what="6 requests in /metrics",
            )
            amb.stop()

    for name, (kind, labels) in SPEC_FAMILIES.items():
        family = families[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            sampleLabels = set(sample.labels) - {"le"}
            assert sampleLabels == labels, (name, sample)

    requests = total(families, "ambassador_requests", route="echo")
    attempts = total(families, "ambassador_attempts", route="echo")
    retries = total(families, "ambassador_retries", route="echo")
    assert total(families, "ambassador_requests", route="echo", result="ok") == requests == 6
    assert attempts >= requests
    assert retries == attempts - requests  # no request failed
    assert total(families, "ambassador_attempts", route="echo", upstream=live.address,
                 result="ok") == 6
    assert total(families, "ambassador_attempts", route="echo", upstream=dead,
                 result="connect-failure") == retries > 0
    sent = sum(len(p) for p in payloads)
    assert total(families, "ambassador_bytes", route="echo", direction="upstream") == sent
    assert total(families, "ambassador_bytes", route="echo", direction="downstream") == sent
    assert total(families, "ambassador_request_duration_seconds", "_count", route="echo") == 6
    assert total(families, "ambassador_active_connections", "", route="echo") == 0
    states = {s.labels["upstream"]: s.value for s in samples(families, "ambassador_breaker_state")}
    assert set(states) == {dead, live.address}
    assert states[live.address] == 0
    assert total(families, "ambassador_config_reloads", result="ok") == 0
    assert total(families, "ambassador_config_reloads", result="error") == 0


class RestartableEcho:
    """An echo member on a fixed port that can be killed and brought back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"tcp:127.0.0.1:{port}"
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)
        self.listener = listener
        self.thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self.thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.thread is not None:
            self.thread.join(2)


def breakerState(admin: int, upstream: str) -> float:
    [sample] = samples(metrics(admin), "ambassador_breaker_state", upstream=upstream)
    return sample.value


def test_killing_the_only_member_opens_its_breaker_and_unreadies_until_it_returns(
    tmp_path,
) -> None:
    listen, admin = freePort(), freePort()
    member = RestartableEcho(freePort())
    member.start()
    config = f"""
[defaults.retry]
attempts = 2
backoff_base = "1ms"
backoff_max = "1ms"

[defaults.breaker]
failure_threshold = 2
reset_timeout = "1s"

[[route]]
name = "solo"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["{member.address}"]
"""
    try:
        with Ambassador(tmp_path, config=config, args=["--admin", f"tcp:{admin}"]):
            assert get(admin, "/live")[0] == 200
            assert get(admin, "/ready")[0] == 200
            assert echoThrough(listen, b"ping") == b"ping"
            assert breakerState(admin, member.address) == 0

            member.stop()
            assert echoThrough(listen, b"lost") == b""  # two connect failures: open
            assert breakerState(admin, member.address) == 2
            assert get(admin, "/ready")[0] == 503
            status = json.loads(get(admin, "/status?route=solo")[1])
            [solo] = status["routes"]
            assert solo["members"][0]["breaker"] == "open"
            assert solo["members"][0]["failures"] >= 2
            assert isinstance(solo["members"][0]["breaker_changed_at"], float)
            assert abs(solo["members"][0]["breaker_changed_at"] - time.time()) < 30

            member.start()
            # open -> half-open is computed lazily: the scrape must still see it
            waitFor(lambda: breakerState(admin, member.address) == 1, timeout=5,
                    what="half-open after reset_timeout")
            assert get(admin, "/ready")[0] == 200
            assert echoThrough(listen, b"back") == b"back"  # the trial closes it
            assert breakerState(admin, member.address) == 0
            assert get(admin, "/ready")[0] == 200
    finally:
        member.stop()


def test_status_lists_routes_members_and_budget(tmp_path) -> None:
    first, second, admin = freePort(), freePort(), freePort()
    with echoServer() as live:
        routes = [f"tcp tcp:{first} {live.address}", f"tcp tcp:{second} {live.address}"]
        with Ambassador(tmp_path, routes=routes, args=["--admin", f"tcp:{admin}"]):
            assert echoThrough(first, b"x") == b"x"
            status, body = get(admin, "/status")
            assert status == 200
            document = json.loads(body)
            assert [r["name"] for r in document["routes"]] == ["tcp-1", "tcp-2"]
            route = document["routes"][0]
            assert route["protocol"] == "tcp"
            assert route["listen"] == f"tcp:{first}:interface=127.0.0.1"
            assert "traces" not in route
            [m] = route["members"]
            assert m["upstream"] == live.address
            assert m["breaker"] == "closed" and m["healthy"] is True
            assert m["in_flight"] in (0, 1)
            assert m["attempts"] == 1 and m["failures"] == 0
            assert m["breaker_changed_at"] is None
            assert set(route["budget"]) >= {"retries", "requests", "allowed"}
            assert route["budget"]["requests"] == 1 and route["budget"]["retries"] == 0
            assert route["budget"]["allowed"] >= 100  # budget_min_per_second 10 * 10 s

            only = json.loads(get(admin, "/status?route=tcp-2")[1])
            assert [r["name"] for r in only["routes"]] == ["tcp-2"]
            assert only["routes"][0]["traces"] == []
            assert get(admin, "/status?route=nope")[0] == 404
            assert get(admin, "/nothing-here")[0] == 404


def test_json_log_format_gives_one_object_a_line_with_access_fields(tmp_path) -> None:
    listen, quiet, admin = freePort(), freePort(), freePort()
    with echoServer() as live:
        config = f"""
[[route]]
name = "quiet"
protocol = "tcp"
listen = "tcp:{quiet}"
upstreams = ["{live.address}"]
access_log = false
"""
        amb = Ambassador(
            tmp_path, config=config, routes=[f"tcp tcp:{listen} {live.address}"],
            args=["--admin", f"tcp:{admin}", "--log-format", "json"],
        )
        try:
            assert echoThrough(quiet, b"unlogged") == b"unlogged"
            for payload in (b"one", b"three"):
                assert echoThrough(listen, payload) == payload
            amb.waitForLog(r'"attempts"', count=2)
            # the quiet route's connection was counted, but never logged
            waitFor(lambda: total(metrics(admin), "ambassador_requests", route="quiet") == 1,
                    what="the quiet route's request in /metrics")
        finally:
            assert amb.stop() == 0
    lines = amb.log().splitlines()
    assert lines
    objects = [json.loads(line) for line in lines]  # every line, not only access lines
    assert all(isinstance(o, dict) for o in objects)
    access = [o for o in objects if "attempts" in o]
    assert len(access) == 2
    fields = {"route", "upstream", "attempts", "result", "status", "bytes_in", "bytes_out",
              "duration_ms"}
    for line in access:
        assert set(line) == fields
        assert line["route"] == "tcp-1" and line["upstream"] == live.address
        assert line["attempts"] == 1 and line["result"] == "ok" and line["status"] is None
        assert line["duration_ms"] >= 0
    assert [(a["bytes_in"], a["bytes_out"]) for a in access] == [(3, 3), (5, 5)]
    others = [o for o in objects if "attempts" not in o]
    assert any("starting up" in o["message"] for o in others)


def test_admin_port_in_use_exits_non_zero_before_starting(tmp_path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        amb = Ambassador(tmp_path, routes=[f"tcp tcp:{freePort()} tcp:127.0.0.1:9"],
                         args=["--admin", f"tcp:{port}"], wait=False)
        try:
            code = amb.wait(20)
        except subprocess.TimeoutExpired:
            amb.stop()
            pytest.fail("the ambassador kept running with its admin port taken")
        assert code != 0
        assert "admin" in amb.log() and str(port) in amb.log()
    finally:
        taken.close()


def test_admin_none_turns_it_off(tmp_path) -> None:
    admin = freePort()
    with Ambassador(tmp_path, routes=[f"tcp tcp:{freePort()} tcp:127.0.0.1:9"],
                    args=["--admin", "none"]) as amb:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", admin), timeout=1).close()
        assert "admin listening" not in amb.log()


def test_ready_is_503_while_draining_and_the_admin_answers_until_the_end(tmp_path) -> None:
    import signal

    listen, admin = freePort(), freePort()
    with echoServer() as live:
        config = f"""
[[route]]
name = "slow"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["{live.address}"]
drain_timeout = "20s"
"""
        amb = Ambassador(tmp_path, config=config, args=["--admin", f"tcp:{admin}"])
        try:
            held = socket.create_connection(("127.0.0.1", listen), timeout=5)
            held.sendall(b"hold")
            assert held.recv(10) == b"hold"
            assert get(admin, "/ready")[0] == 200
            amb.signal(signal.SIGTERM)
            amb.waitForLog(r"draining 1 connections")
            assert get(admin, "/ready")[0] == 503
            assert get(admin, "/live")[0] == 200
            assert amb.process.poll() is None
            held.close()
            assert amb.wait(15) == 0
        finally:
            amb.stop()
