"""DNS and SRV discovery from outside: the real twistd, the tests' own DNS server
(tests/dnspeer.py) as the only ``[dns] servers`` entry, members on 127.0.0.1-3.

Every member answers a connection with its own address and closes, so each request
through the tcp route says which member served it.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest
from dnspeer import DNSPeer
from harness import Ambassador, freePort


class NamedMember:
    """A TCP server on ADDRESS:PORT that sends its address to each connection and closes."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.server = socket.create_server((address, port))
        self.server.settimeout(0.2)
        self.served = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self.served += 1
                conn.sendall(self.address.encode() + b"\n")

    def stop(self) -> None:
        self.stopped = True
        self.thread.join(2)
        self.server.close()


def sharedPort() -> int:
    """A port free on 127.0.0.1, .2 and .3 alike (the A records share one port)."""
    for _ in range(20):
        port = freePort()
        try:
            for last in (2, 3):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{last}", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on 127.0.0.1-3")


def ask(port: int) -> str:
    """One request through the tcp route: the serving member's address."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(100)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def readyCode(admin: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as r:
            return r.status  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        return e.code


def config(dnsPort: int, listen: int, upstream: str, extra: str = "") -> str:
    return f"""
[dns]
servers = ["127.0.0.1:{dnsPort}"]
refresh = "2s"

[[route]]
name = "svc"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["{upstream}"]
{extra}
"""


@pytest.fixture
def members():
    port = sharedPort()
    started = [NamedMember(f"127.0.0.{i}", port) for i in (1, 2, 3)]
    yield port, started
    for member in started:
        member.stop()


def test_dns_members_spread_follow_the_records_and_survive_a_dead_dns_server(tmp_path, members):
    port, _servers = members
    zone = {"svc.test": {"ttl": 1, "A": ["127.0.0.1", "127.0.0.2", "127.0.0.3"]}}
    listen, admin = freePort(), freePort()
    with DNSPeer(tmp_path, zone) as dnsPeer, Ambassador(
        tmp_path, config=config(dnsPeer.port, listen, f"dns:svc.test:{port}"),
        args=["--admin", f"tcp:{admin}:interface=127.0.0.1"],
    ) as amb:
        amb.waitForLog(rf"dns:svc.test:{port} -> ")
        served = Counter(ask(listen) for _ in range(30))
        assert served == {"127.0.0.1": 10, "127.0.0.2": 10, "127.0.0.3": 10}

        # Only the configured server is asked, and it was.
        discovery = status(admin)["routes"][0]["discovery"][0]
        assert discovery["servers"] == [f"127.0.0.1:{dnsPeer.port}"]
        assert discovery["state"] == "ok"
        queries = dnsPeer.queries()
        assert ("127.0.0.1", "svc.test", "A") in queries
        assert {client for client, _, _ in queries} == {"127.0.0.1"}
        members = {m["upstream"] for m in status(admin)["routes"][0]["members"]}
        assert members == {f"tcp:127.0.0.{i}:{port}" for i in (1, 2, 3)}

        # One record goes: traffic moves to the other two after the TTL, no request fails.
        dnsPeer.setZone({"svc.test": {"ttl": 1, "A": ["127.0.0.1", "127.0.0.3"]}})
        during: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "removed: tcp:127.0.0.2" not in amb.log():
            during.append(ask(listen))
            time.sleep(0.02)
        assert "removed: tcp:127.0.0.2" in amb.log()
        assert all(during), "a request failed while the member set changed"
        after = Counter(ask(listen) for _ in range(20))
        assert after == {"127.0.0.1": 10, "127.0.0.3": 10}

        # The DNS server goes away: the last known members keep the traffic.
        dnsPeer.stop()
        amb.waitForLog(rf"resolving dns:svc.test:{port} failed \(timeout\); keeping the last good", timeout=15)
        stale = Counter(ask(listen) for _ in range(20))
        assert stale == {"127.0.0.1": 10, "127.0.0.3": 10}
        discovery = status(admin)["routes"][0]["discovery"][0]
        assert discovery["state"] == "failed" and discovery["error"] == "timeout"
        assert sorted(discovery["members"]) == [f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.3:{port}"]
        assert readyCode(admin) == 200


def test_srv_priorities_and_weights(tmp_path, members):
    port, servers = members
    name = "_echo._tcp.svc.test"
    zone = {
        name: {"ttl": 1, "SRV": [[10, 3, port, "a.svc.test"], [10, 1, port, "b.svc.test"],
                                 [20, 1, port, "c.svc.test"]]},
        "a.svc.test": {"A": ["127.0.0.1"]},
        "b.svc.test": {"A": ["127.0.0.2"]},
        "c.svc.test": {"A": ["127.0.0.3"]},
    }
    extra = '[route.breaker]\nfailure_threshold = 1\nreset_timeout = "60s"\n'
    listen = freePort()
    with DNSPeer(tmp_path, zone) as dnsPeer, Ambassador(
        tmp_path, config=config(dnsPeer.port, listen, f"srv:{name}", extra),
    ) as amb:
        amb.waitForLog(rf"srv:{name} -> ")
        served = Counter(ask(listen) for _ in range(80))
        assert "127.0.0.3" not in served  # priority 20 waits while priority 10 is usable
        assert 2.5 <= served["127.0.0.1"] / served["127.0.0.2"] <= 3.5, served  # weights 3:1
        assert ("127.0.0.1", name, "SRV") in dnsPeer.queries()

        # Every member of priority 10 goes down: priority 20 takes over.
        servers[0].stop()
        servers[1].stop()
        takeover = [ask(listen) for _ in range(20)]
        assert all(takeover), takeover  # connect failures were retried on the next member
        assert takeover[-10:] == ["127.0.0.3"] * 10


class HealthMember:
    """An HTTP member: ``/health`` answers ``healthStatus``; every other path 200 with
    the member's address; user requests are counted."""

    def __init__(self, address: str, port: int, healthStatus: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        member = self
        self.userRequests = 0
        self.healthRequests = 0
        self.hosts: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/health":
                    member.healthRequests += 1
                    code, body = healthStatus, b"health\n"
                else:
                    member.userRequests += 1
                    member.hosts.append(self.headers.get("Host"))
                    code, body = 200, address.encode()
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_health_check_failing_member_is_left_out_before_any_user_request(tmp_path):
    port = sharedPort()
    good, bad = HealthMember("127.0.0.1", port, 200), HealthMember("127.0.0.2", port, 500)
    zone = {"svc.test": {"ttl": 1, "A": ["127.0.0.1", "127.0.0.2"]}}
    listen, admin = freePort(), freePort()
    text = f"""
[dns]
servers = ["127.0.0.1:{{dns}}"]

[[route]]
name = "web"
protocol = "http"
listen = "tcp:{listen}"
upstreams = ["dns:svc.test:{port}"]

[route.health]
interval = "200ms"
timeout = "1s"
unhealthy_threshold = 2
healthy_threshold = 2
"""
    try:
        with DNSPeer(tmp_path, zone) as dnsPeer, Ambassador(
            tmp_path, config=text.replace("{dns}", str(dnsPeer.port)),
            args=["--admin", f"tcp:{admin}:interface=127.0.0.1"],
        ) as amb:
            amb.waitForLog(rf"tcp:127.0.0.2:{port} is unhealthy after 2 failed checks")
            members = {m["upstream"]: m for m in status(admin)["routes"][0]["members"]}
            assert members[f"tcp:127.0.0.2:{port}"]["healthy"] is False
            assert members[f"tcp:127.0.0.1:{port}"]["healthy"] is True
            for _ in range(20):
                with urllib.request.urlopen(f"http://127.0.0.1:{listen}/user", timeout=5) as r:
                    assert r.status == 200 and r.read() == b"127.0.0.1"
            assert bad.userRequests == 0 and bad.healthRequests >= 2
            assert good.userRequests == 20
            assert readyCode(admin) == 200
    finally:
        good.stop()
        bad.stop()


def test_a_route_with_no_member_discovered_yet_answers_no_upstream_and_is_not_ready(tmp_path):
    port = sharedPort()
    member = HealthMember("127.0.0.1", port, 200)
    listen, admin = freePort(), freePort()
    text = f"""
[dns]
servers = ["127.0.0.1:{{dns}}"]
refresh = "1s"

[[route]]
name = "web"
protocol = "http"
listen = "tcp:{listen}"
upstreams = ["dns:later.test:{port}"]
"""
    try:
        with DNSPeer(tmp_path, {}) as dnsPeer, Ambassador(
            tmp_path, config=text.replace("{dns}", str(dnsPeer.port)),
            args=["--admin", f"tcp:{admin}:interface=127.0.0.1"],
        ) as amb:
            amb.waitForLog(r"dns:later.test:\d+ has no record")
            assert readyCode(admin) == 503
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{listen}/x", timeout=5)
            assert refused.value.code == 503
            assert refused.value.headers["x-ambassador-error"] == "no-upstream"
            dnsPeer.setZone({"later.test": {"ttl": 1, "A": ["127.0.0.1"]}})
            amb.waitForLog(r"dns:later.test:\d+ -> tcp:127.0.0.1", timeout=10)
            with urllib.request.urlopen(f"http://127.0.0.1:{listen}/x", timeout=5) as r:
                assert r.read() == b"127.0.0.1"
            assert readyCode(admin) == 200
            # the Host of a discovered member is its DNS name, not its address (SPEC §2)
            assert member.hosts[-1] == f"later.test:{port}"
    finally:
        member.stop()


def test_reload_keeps_the_discovered_members(tmp_path, members):
    port, _servers = members
    zone = {"svc.test": {"ttl": 30, "A": ["127.0.0.1", "127.0.0.2"]}}
    listen = freePort()
    with DNSPeer(tmp_path, zone) as dnsPeer:
        text = config(dnsPeer.port, listen, f"dns:svc.test:{port}")
        with Ambassador(tmp_path, config=text) as amb:
            amb.waitForLog(rf"dns:svc.test:{port} -> ")
            assert {ask(listen) for _ in range(4)} == {"127.0.0.1", "127.0.0.2"}
            # A changed setting: the new route starts with the members found so far.
            dnsPeer.stop()  # and it could not find them again now
            assert amb.configPath is not None
            amb.configPath.write_text(text.replace('name = "svc"', 'name = "svc"\nconnect_timeout = "1s"'))
            amb.signal(signal.SIGHUP)
            amb.waitForLog(r"reload: done")
            assert (f"members kept with their breaker state: tcp:127.0.0.1:{port} "
                    f"tcp:127.0.0.2:{port}") in amb.log()
            assert {ask(listen) for _ in range(4)} == {"127.0.0.1", "127.0.0.2"}
