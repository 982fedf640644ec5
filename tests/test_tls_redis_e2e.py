"""redis (line) routes to TLS members, from outside: a real ``redis-server --tls-port``
requiring client certificates, reached through ``[route.tls]``; bad member
certificates give the ``-ERR ambassador tls-error`` reply; pooled member connections
keep TLS handshakes rare."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from harness import Ambassador, freePort, waitForPort
from tlspeers import Certs, TLSEchoMember

redis = pytest.importorskip("redis")
pool = pytest.importorskip("ambassador.protocols.line.pool", reason="needs the line route")

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


class RawRedis:
    """RESP2 over a plain socket: exactly the bytes a test means, nothing a client
    library adds on connect (redis-py 8 sends commands a pooled proxy refuses)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def command(self, *args: str) -> bytes:
        """Send one command, return its reply's first line (replies here are short)."""
        out = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(out)
        line = self._line()
        if line.startswith(b"$") and line != b"$-1":
            return self._line()
        return line

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()


class World:
    def __init__(self, tmp) -> None:
        self.certs = c = Certs(tmp / "certs")
        self.redisPort = freePort()
        self.redis = subprocess.Popen(
            [
                "redis-server", "--port", "0", "--tls-port", str(self.redisPort),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--tls-cert-file", c.path("server.pem"), "--tls-key-file", c.path("server.key"),
                "--tls-ca-cert-file", c.path("ca.pem"), "--tls-auth-clients", "yes",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
        )
        waitForPort(self.redisPort)
        self.bad = {name: TLSEchoMember(c.serverContext(name)) for name in ("untrusted", "wrongname", "expired")}
        self.ports: dict[str, int] = {}
        trust = f'trust_roots = "{c.path("ca.pem")}"\nserver_name = "localhost"\n'
        client = f'certificate = "{c.path("client.pem")}"\nprivate_key = "{c.path("client.key")}"\n'
        routes = []
        for name, member, extra in [
            ("good", self.redisPort, client),
            *[(bad, m.port, client) for bad, m in self.bad.items()],
        ]:
            self.ports[name] = port = freePort()
            routes.append(
                f'[[route]]\nname = "{name}"\nprotocol = "line"\ndialect = "redis"\n'
                f'listen = "tcp:{port}"\nupstreams = ["tcp:127.0.0.1:{member}"]\n'
                f"[route.retry]\nattempts = 1\n[route.tls]\n{trust}{extra}"
            )
        config = '[defaults]\nconnect_timeout = "3s"\ndeadline = "5s"\n' + "".join(routes)
        self.ambassador = Ambassador(tmp, config=config)

    def direct(self):  # type: ignore[no-untyped-def]
        c = self.certs
        return redis.Redis(
            host="127.0.0.1", port=self.redisPort, ssl=True, ssl_ca_certs=c.path("ca.pem"),
            ssl_certfile=c.path("client.pem"), ssl_keyfile=c.path("client.key"),
            socket_timeout=10,
        )

    def client(self, route: str) -> RawRedis:
        return RawRedis(self.ports[route])

    def stop(self) -> None:
        self.ambassador.stop()
        self.redis.terminate()
        try:
            self.redis.wait(5)
        except subprocess.TimeoutExpired:
            self.redis.kill()
        for member in self.bad.values():
            member.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("tlsredis"))
    yield w
    w.stop()


def _connectionsReceived(world: World) -> int:
    direct = world.direct()
    try:
        return int(direct.info("stats")["total_connections_received"])
    finally:
        direct.close()


def test_redis_route_reaches_a_mutual_tls_redis(world):
    r = world.client("good")
    assert r.command("SET", "tls-key", "value") == b"+OK"
    assert r.command("GET", "tls-key") == b"value"
    r.close()
    assert world.direct().get("tls-key") == b"value"


@pytest.mark.parametrize("route", ["untrusted", "wrongname", "expired"])
def test_redis_bad_member_certificate_is_a_tls_error_reply(world, route):
    r = world.client(route)
    assert r.command("GET", "anything") == b"-ERR ambassador tls-error"
    r.close()


def test_redis_pooled_member_connections_keep_tls_handshakes_rare(world):
    """Ten app connections, 200 commands: the route's pool opens at most POOL_SIZE
    TLS connections to the member (a handshake each), however many commands flow."""
    before = _connectionsReceived(world)
    apps = [world.client("good") for _ in range(10)]
    for j in range(10):
        for i, r in enumerate(apps):
            assert r.command("SET", f"k{i}-{j}", str(j)) == b"+OK"
            assert r.command("GET", f"k{i}-{j}") == str(j).encode()
    for r in apps:
        r.close()
    after = _connectionsReceived(world)
    handshakes = after - before - 1  # `after` also counts the direct connection asking
    assert 1 <= handshakes <= pool.POOL_SIZE
