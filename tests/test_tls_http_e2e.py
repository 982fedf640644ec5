"""http routes to TLS members, from outside (SPEC §4/http, §5): the right CA works
(and pooled member connections keep handshakes rare); an untrusted CA, a wrong name
or an expired certificate is a 502 with ``x-ambassador-error: tls-error``."""

from __future__ import annotations

import http.client
import json

import pytest
from harness import Ambassador, freePort
from tlspeers import Certs, HTTPSMember


class World:
    def __init__(self, tmp) -> None:
        self.certs = c = Certs(tmp / "certs")
        self.members = {
            name: HTTPSMember(c.serverContext(name))
            for name in ("server", "untrusted", "wrongname", "expired")
        }
        self.pooled = HTTPSMember(c.serverContext("server"))
        self.ports: dict[str, int] = {}
        routes = []

        def route(name: str, upstreams: list[str], tls: bool = True, attempts: int = 1) -> None:
            self.ports[name] = port = freePort()
            text = (
                f'[[route]]\nname = "{name}"\nprotocol = "http"\nlisten = "tcp:{port}"\n'
                "upstreams = [" + ", ".join(f'"{u}"' for u in upstreams) + "]\n"
                f'[route.retry]\nattempts = {attempts}\nbackoff_base = "1ms"\n'
            )
            if tls:
                text += f'[route.tls]\ntrust_roots = "{c.path("ca.pem")}"\nserver_name = "localhost"\n'
            routes.append(text)

        m = {name: member.port for name, member in self.members.items()}
        route("good", [f"tcp:127.0.0.1:{m['server']}"])
        route("pooled", [f"tcp:127.0.0.1:{self.pooled.port}"])
        route("string", [f"tls:localhost:{m['server']}:trustRoots={c.path('ca')}"], tls=False)
        for bad in ("untrusted", "wrongname", "expired"):
            route(bad, [f"tcp:127.0.0.1:{m[bad]}"])
        route("retry", [f"tcp:127.0.0.1:{m['expired']}", f"tcp:127.0.0.1:{m['server']}"], attempts=2)
        config = '[defaults]\nconnect_timeout = "3s"\ndeadline = "5s"\n' + "".join(routes)
        self.ambassador = Ambassador(tmp, config=config)

    def get(self, route: str, path: str = "/", connection: http.client.HTTPConnection | None = None):
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.ports[route], timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if connection is None:
            conn.close()
        return response, body

    def stop(self) -> None:
        self.ambassador.stop()
        for member in [*self.members.values(), self.pooled]:
            member.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("tlshttp"))
    yield w
    w.stop()


def test_http_route_tls_table_with_the_right_ca(world):
    response, body = world.get("good", "/hello")
    assert response.status == 200
    assert json.loads(body)["path"] == "/hello"
    assert response.getheader("x-ambassador-attempts") == "1"


def test_http_tls_string_member_with_the_right_ca(world):
    response, body = world.get("string", "/via-string")
    assert response.status == 200
    assert json.loads(body)["path"] == "/via-string"


@pytest.mark.parametrize("route", ["untrusted", "wrongname", "expired"])
def test_http_bad_member_certificate_is_502_tls_error(world, route):
    before = world.members[route].requests
    response, _ = world.get(route, "/secret")
    assert response.status == 502
    assert response.getheader("x-ambassador-error") == "tls-error"
    assert world.members[route].requests == before  # the request never reached it


def test_http_tls_error_is_retried_on_another_member(world):
    response, _ = world.get("retry", "/again")
    assert response.status == 200
    assert response.getheader("x-ambassador-attempts") == "2"


def test_http_pooled_member_connections_keep_tls_handshakes_rare(world):
    conn = http.client.HTTPConnection("127.0.0.1", world.ports["pooled"], timeout=10)
    try:
        for i in range(20):
            response, _ = world.get("pooled", f"/n{i}", connection=conn)
            assert response.status == 200
    finally:
        conn.close()
    for i in range(5):  # new app connections reuse the route's pooled member connection
        response, _ = world.get("pooled", f"/fresh{i}")
        assert response.status == 200
    assert world.pooled.requests == 25
    assert world.pooled.handshakes == 1


def test_no_unhandled_errors_were_logged(world):
    log = world.ambassador.log()
    assert "Unhandled Error" not in log and "Traceback" not in log
