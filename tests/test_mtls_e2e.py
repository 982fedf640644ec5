"""Mutual TLS from outside (SPEC §5): client certificates towards members, and the
``mtls:`` listener, through the real twistd; ``mtls:`` in a plain Twisted program.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from harness import Ambassador, freePort
from tlspeers import Certs, TLSEchoMember, exchange


class World:
    def __init__(self, tmp) -> None:
        self.certs = c = Certs(tmp / "certs")
        self.strict = TLSEchoMember(c.serverContext("server", requireClient=True))
        self.plain = TLSEchoMember(None)
        self.ports: dict[str, int] = {}
        strict = self.strict.port
        trust = f'trust_roots = "{c.path("ca.pem")}"\nserver_name = "localhost"\n'
        clientCert = f'certificate = "{c.path("client.pem")}"\nprivate_key = "{c.path("client.key")}"\n'
        for name in ("no-client-cert", "table-client-cert", "string-client-cert", "mtls-listener",
                     "ssl-listener"):
            self.ports[name] = freePort()
        listener = (
            f"mtls:{self.ports['mtls-listener']}:privateKey={c.path('server.key')}"
            f":certKey={c.path('server.pem')}:caCerts={c.path('ca.pem')}"
        )
        string = (
            f"tls:localhost:{strict}:trustRoots={c.path('ca')}"
            f":certificate={c.path('client.pem')}:privateKey={c.path('client.key')}"
        )
        config = f"""
[defaults]
connect_timeout = "3s"
deadline = "5s"
[defaults.retry]
attempts = 1

[[route]]
name = "no-client-cert"
protocol = "tcp"
listen = "tcp:{self.ports['no-client-cert']}"
upstreams = ["tcp:127.0.0.1:{strict}"]
[route.tls]
{trust}
[[route]]
name = "table-client-cert"
protocol = "tcp"
listen = "tcp:{self.ports['table-client-cert']}"
upstreams = ["tcp:127.0.0.1:{strict}"]
[route.tls]
{trust}{clientCert}
[[route]]
name = "string-client-cert"
protocol = "tcp"
listen = "tcp:{self.ports['string-client-cert']}"
upstreams = ["{string}"]

[[route]]
name = "ssl-listener"
protocol = "tcp"
listen = "ssl:{self.ports['ssl-listener']}:privateKey={c.path('server.key')}:certKey={c.path('server.pem')}"
upstreams = ["tcp:127.0.0.1:{self.plain.port}"]

[[route]]
name = "mtls-listener"
protocol = "tcp"
listen = "{listener}"
upstreams = ["tcp:127.0.0.1:{self.plain.port}"]
"""
        self.ambassador = Ambassador(tmp, config=config)

    def stop(self) -> None:
        self.ambassador.stop()
        self.strict.stop()
        self.plain.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("mtls"))
    yield w
    w.stop()


def _waitFor(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_member_requiring_a_client_certificate_refuses_the_ambassador_without_one(world):
    errors = len(world.strict.handshakeErrors)
    assert exchange(world.ports["no-client-cert"], b"hello") == b""
    assert _waitFor(lambda: len(world.strict.handshakeErrors) > errors)
    assert "certificate" in world.strict.handshakeErrors[-1].lower()


def test_member_accepts_the_route_tls_client_certificate(world):
    assert exchange(world.ports["table-client-cert"], b"hello") == b"HELLO"
    assert "client.test" in world.strict.clientSubjects


def test_member_accepts_the_client_certificate_of_a_tls_string(world):
    before = world.strict.clientSubjects.count("client.test")
    assert exchange(world.ports["string-client-cert"], b"string") == b"STRING"
    assert world.strict.clientSubjects.count("client.test") == before + 1


def test_mtls_listener_refuses_an_app_without_a_client_certificate(world):
    accepted = world.plain.accepted
    assert exchange(world.ports["mtls-listener"], b"hello", world.certs.clientContext()) == b""
    assert world.plain.accepted == accepted  # no member connection was made for it


def test_mtls_listener_refuses_a_client_certificate_from_another_ca(world):
    context = world.certs.clientContext("rogue-client")
    accepted = world.plain.accepted
    assert exchange(world.ports["mtls-listener"], b"hello", context) == b""
    assert world.plain.accepted == accepted


def test_mtls_listener_serves_an_app_with_the_right_client_certificate(world):
    context = world.certs.clientContext("client")
    assert exchange(world.ports["mtls-listener"], b"hello", context) == b"HELLO"


def test_ssl_listener_serves_tls_apps_without_client_certificates(world):
    assert exchange(world.ports["ssl-listener"], b"hello", world.certs.clientContext()) == b"HELLO"


def test_mtls_listener_binds_loopback_by_default(world):
    world.ambassador.waitForLog(rf"listening on mtls:{world.ports['mtls-listener']}:.*:interface=127\.0\.0\.1")


PLAIN_PROGRAM = textwrap.dedent("""
    # A Twisted program that knows nothing of ambassador but the endpoint string.
    import sys
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol

    class Upper(Protocol):
        def dataReceived(self, data):
            self.transport.write(data.upper())

    endpoint = serverFromString(reactor, sys.argv[1])
    d = endpoint.listen(Factory.forProtocol(Upper))
    d.addCallback(lambda port: print("listening", port.getHost().port, flush=True))
    d.addErrback(lambda f: (print("failed", f.getErrorMessage(), flush=True), reactor.stop()))
    reactor.callLater(60, reactor.stop)
    reactor.run()
""")


def test_mtls_endpoint_string_works_in_a_plain_twisted_program(tmp_path):
    certs = Certs(tmp_path / "certs")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PROGRAM)
    port = freePort()
    description = (
        f"mtls:{port}:privateKey={certs.path('server.key')}:certKey={certs.path('server.pem')}"
        f":caCerts={certs.path('ca.pem')}:interface=127.0.0.1"
    )
    process = subprocess.Popen(
        [sys.executable, str(script), description], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # the program prints one line once it listens
        assert first.startswith("listening"), first
        assert exchange(port, b"plain", certs.clientContext("client")) == b"PLAIN"
        assert exchange(port, b"plain", certs.clientContext()) == b""
        assert exchange(port, b"plain", certs.clientContext("rogue-client")) == b""
    finally:
        process.kill()
        process.wait(5)


def test_no_unhandled_errors_were_logged(world):
    log = world.ambassador.log()
    assert "Unhandled Error" not in log and "Traceback" not in log
