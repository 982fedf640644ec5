"""SPEC §2/§5 from outside: tcp routes to TLS members through the real twistd.

One ambassador process serves every route of this module (one route per behaviour)
to keep the module fast; each test checks one behaviour on its own route.
"""

from __future__ import annotations

import re

import pytest
from harness import Ambassador, freePort
from tlspeers import Certs, TLSEchoMember, exchange


class World:
    """The certificates, the members and the ambassador shared by this module."""

    def __init__(self, tmp) -> None:
        self.certs = Certs(tmp / "certs")
        c = self.certs
        self.members = {
            "good": TLSEchoMember(c.serverContext("server")),
            "untrusted": TLSEchoMember(c.serverContext("untrusted")),
            "wrongname": TLSEchoMember(c.serverContext("wrongname")),
            "expired": TLSEchoMember(c.serverContext("expired")),
        }
        self.ports: dict[str, int] = {}
        routes = []

        def route(name: str, upstreams: list[str], tls: dict[str, str] | None = None,
                  attempts: int = 1) -> None:
            port = self.ports[name] = freePort()
            text = (
                f'[[route]]\nname = "{name}"\nprotocol = "tcp"\nlisten = "tcp:{port}"\n'
                f"upstreams = {upstreams!r}\n".replace("'", '"')
                + f"[route.retry]\nattempts = {attempts}\nbackoff_base = \"1ms\"\n"
            )
            if tls is not None:
                text += "[route.tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
            routes.append(text)

        m = {k: v.port for k, v in self.members.items()}
        trust = {"trust_roots": c.path("ca.pem")}
        route("table", [f"tcp:127.0.0.1:{m['good']}"], {**trust, "server_name": "localhost"})
        route("table-ip", [f"tcp:127.0.0.1:{m['good']}"], trust)
        route("string", [f"tls:localhost:{m['good']}:trustRoots={c.path('ca')}"])
        route("untrusted", [f"tcp:127.0.0.1:{m['untrusted']}"], trust)
        route("untrusted-string", [f"tls:localhost:{m['untrusted']}:trustRoots={c.path('ca')}"])
        route("wrongname", [f"tcp:127.0.0.1:{m['wrongname']}"], {**trust, "server_name": "localhost"})
        route("wrongname-string", [f"tls:localhost:{m['wrongname']}:trustRoots={c.path('ca')}"])
        route("expired", [f"tcp:127.0.0.1:{m['expired']}"], trust)
        route(
            "retry",
            [f"tcp:127.0.0.1:{m['untrusted']}", f"tcp:127.0.0.1:{m['good']}"],
            {**trust, "server_name": "localhost"}, attempts=2,
        )
        route("breaker", [f"tcp:127.0.0.1:{m['expired']}"], trust)
        config = "[defaults]\nconnect_timeout = \"3s\"\ndeadline = \"5s\"\n" + "".join(routes)
        config += "[route.breaker]\nfailure_threshold = 2\nreset_timeout = \"1h\"\n"
        self.ambassador = Ambassador(tmp, config=config)

    def stop(self) -> None:
        self.ambassador.stop()
        for member in self.members.values():
            member.stop()

    def access(self, route: str, count: int = 1) -> list[dict[str, str]]:
        self.ambassador.waitForLog(rf"access#info\] {re.escape(route)} ", count=count)
        return [line for line in self.ambassador.accessLines() if line["route"] == route]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("tls"))
    yield w
    w.stop()


def test_route_tls_table_with_the_right_ca_relays_bytes_and_sends_sni(world):
    assert exchange(world.ports["table"], b"hello") == b"HELLO"
    assert "localhost" in world.members["good"].serverNames
    [line] = world.access("table")
    assert line["result"] == "ok"


def test_route_tls_without_server_name_verifies_the_member_ip(world):
    assert exchange(world.ports["table-ip"], b"by ip") == b"BY IP"


def test_tls_string_with_trust_roots_directory_relays_bytes(world):
    assert exchange(world.ports["string"], b"string") == b"STRING"


@pytest.mark.parametrize("route, subject, why", [
    ("untrusted", "untrusted.test", "unable to get local issuer certificate"),
    ("untrusted-string", "untrusted.test", "unable to get local issuer certificate"),
    ("wrongname", "other.example", "does not match the name"),
    ("wrongname-string", "other.example", "does not match the name"),
    ("expired", "expired.test", "certificate has expired"),
])
def test_bad_member_certificate_closes_the_app_with_tls_error_logged_once(world, route, subject, why):
    assert exchange(world.ports[route], b"secret") == b""
    [line] = world.access(route)
    assert line["result"] == "tls-error"
    assert line["attempts"] == "1"
    assert line["bytes_out"] == "0"
    logged = re.findall(
        rf"route {re.escape(route)}: TLS handshake with \S+ failed \(tls-error\): (.*)", world.ambassador.log()
    )
    assert len(logged) == 1, logged
    assert why in logged[0]
    assert subject in logged[0]


def test_the_member_never_sees_the_app_bytes_when_its_certificate_is_bad(world):
    member = world.members["untrusted"]
    assert exchange(world.ports["untrusted"], b"do not leak") == b""
    # the member's side of the handshake failed: it never got to read application data
    assert member.clientSubjects == [] or all(s is None for s in member.clientSubjects)
    assert member.handshakeErrors


def test_tls_error_is_retried_on_another_member(world):
    assert exchange(world.ports["retry"], b"again") == b"AGAIN"
    [line] = world.access("retry")
    assert line["result"] == "ok"
    assert line["attempts"] == "2"
    assert line["upstream"].endswith(f":{world.members['good'].port}")


def test_tls_errors_open_the_breaker(world):
    """failure_threshold = 2: two tls-errors open it; the third app connection fails
    with breaker-open and no attempt (the member accepts no third connection)."""
    member = world.members["expired"]
    for _ in range(2):
        assert exchange(world.ports["breaker"], b"x") == b""
    world.access("breaker", count=2)
    world.ambassador.waitForLog(r"route breaker: breaker of \S+ is open")
    accepted = member.accepted
    assert exchange(world.ports["breaker"], b"x") == b""
    lines = world.access("breaker", count=3)
    assert [line["result"] for line in lines] == ["tls-error", "tls-error", "breaker-open"]
    assert lines[2]["attempts"] == "0"
    assert member.accepted == accepted


def test_app_half_close_reaches_a_tls_member_and_its_answer_comes_back(tmp_path):
    """The app shuts its write side; the member gets a TLS close_notify (not a bare
    FIN), answers, and the answer reaches the app before the pair closes."""
    import socket

    certs = Certs(tmp_path / "certs")
    member = TLSEchoMember(certs.serverContext("server"), atEnd=True)
    listen = freePort()
    config = (
        f'[[route]]\nname = "half"\nprotocol = "tcp"\nlisten = "tcp:{listen}"\n'
        f'upstreams = ["tcp:127.0.0.1:{member.port}"]\n'
        f'[route.tls]\ntrust_roots = "{certs.path("ca.pem")}"\nserver_name = "localhost"\n'
    )
    try:
        with Ambassador(tmp_path, config=config) as amb:
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as app:
                app.sendall(b"first ")
                app.sendall(b"second")
                app.shutdown(socket.SHUT_WR)
                received = b""
                while True:
                    chunk = app.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            assert received == b"FIRST SECOND"
            amb.waitForLog(r"access#info\] half .*result=ok")
            assert "Unhandled Error" not in amb.log()
            assert "Traceback" not in amb.log()
    finally:
        member.stop()


def test_no_unhandled_errors_were_logged(world):
    log = world.ambassador.log()
    assert "Unhandled Error" not in log and "Traceback" not in log
