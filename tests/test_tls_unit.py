"""TLS without a network: config checks, endpoint-string errors, the mtls: parser,
and the handshake gate driven in memory (iosim pump, task.Clock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tlspeers import Certs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from zope.interface.verify import verifyObject

import twisted.plugins
from ambassador.config import ConfigError, loadConfig
from ambassador.endpoints import EndpointError, checkClientEndpoint
from ambassador.mtls import mtlsServerParser
from ambassador.resilience.reasons import AttemptFailed
from ambassador.tls import VerifiedTLSEndpoint, clientOptions


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


# --- config ---------------------------------------------------------------------------


def _errors(tmp: Path, tls: str, upstreams: str = '["tcp:127.0.0.1:9"]') -> list[str]:
    path = tmp / "ambassador.toml"
    path.write_text(
        f'[[route]]\nname = "db"\nprotocol = "tcp"\nlisten = "tcp:7000"\nupstreams = {upstreams}\n'
        f"[route.tls]\n{tls}"
    )
    with pytest.raises(ConfigError) as caught:
        loadConfig(str(path))
    return caught.value.errors


def test_a_valid_route_tls_table_is_accepted(tmp_path, certs):
    path = tmp_path / "ok.toml"
    path.write_text(
        '[[route]]\nname = "db"\nprotocol = "tcp"\nlisten = "tcp:7000"\n'
        'upstreams = ["tcp:db.internal:5432"]\n[route.tls]\n'
        f'trust_roots = "{certs.path("ca")}"\ncertificate = "{certs.path("client.pem")}"\n'
        f'private_key = "{certs.path("client.key")}"\n'
    )
    [route] = loadConfig(str(path)).routes
    assert route.tls.trustRoots == certs.path("ca")


def test_missing_trust_roots_names_file_route_and_key(tmp_path):
    [error] = _errors(tmp_path, 'trust_roots = "/nonexistent/ca.pem"\n')
    assert error.startswith(str(tmp_path / "ambassador.toml"))
    assert 'route "db"' in error and 'key "tls.trust_roots"' in error and "/nonexistent/ca.pem" in error


def test_trust_roots_without_a_certificate_is_refused(tmp_path, certs):
    [error] = _errors(tmp_path, f'trust_roots = "{certs.path("client.key")}"\n')
    assert 'key "tls.trust_roots"' in error and "no PEM certificate" in error


def test_a_key_that_does_not_match_its_certificate_is_refused(tmp_path, certs):
    [error] = _errors(
        tmp_path,
        f'certificate = "{certs.path("client.pem")}"\nprivate_key = "{certs.path("server.key")}"\n',
    )
    assert 'route "db"' in error and 'key "tls.private_key"' in error
    assert "does not match" in error and "client.pem" in error and "server.key" in error


def test_an_unreadable_key_is_refused(tmp_path, certs):
    key = tmp_path / "garbage.key"
    key.write_text("not a key")
    [error] = _errors(tmp_path, f'certificate = "{certs.path("client.pem")}"\nprivate_key = "{key}"\n')
    assert 'key "tls.private_key"' in error and "garbage.key" in error


def test_route_tls_on_a_tls_member_is_refused(tmp_path, certs):
    [error] = _errors(
        tmp_path, f'trust_roots = "{certs.path("ca.pem")}"\n', '["tls:db.internal:5432"]'
    )
    assert 'route "db"' in error and 'key "tls"' in error and "tls:db.internal:5432" in error


def test_route_tls_on_a_unix_member_needs_server_name(tmp_path, certs):
    [error] = _errors(tmp_path, f'trust_roots = "{certs.path("ca.pem")}"\n', '["unix:/run/db.sock"]')
    assert 'key "tls.server_name"' in error


# --- tls: member strings --------------------------------------------------------------


@pytest.mark.parametrize("options, expected", [
    ("trustRoots=/nonexistent", "trustRoots='/nonexistent': no such directory"),
    ("trustRoots={ca}/ca.pem", "not a directory"),
    ("trustRoots={empty}", "no *.pem file with a CA certificate"),
    ("certificate=/nonexistent.pem", "'/nonexistent.pem': cannot read"),
    ("certificate={client}.pem:privateKey={server}.key", "does not match the certificate"),
    ("privateKey={client}.key", "needs certificate="),
])
def test_bad_tls_member_strings_say_what_is_wrong(tmp_path, certs, options, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    options = options.format(
        ca=certs.path("ca"), empty=empty, client=certs.path("client"), server=certs.path("server")
    )
    with pytest.raises(EndpointError) as caught:
        checkClientEndpoint(f"tls:db.internal:443:{options}")
    assert expected in str(caught.value)
    assert "Unlistable" not in str(caught.value)


def test_a_good_tls_member_string_is_accepted(certs):
    checkClientEndpoint(
        f"tls:db.internal:443:trustRoots={certs.path('ca')}"
        f":certificate={certs.path('client.pem')}:privateKey={certs.path('client.key')}"
    )


# --- mtls: ----------------------------------------------------------------------------


def test_mtls_parser_is_a_twisted_endpoint_plugin():
    assert verifyObject(IStreamServerEndpointStringParser, mtlsServerParser)
    prefixes = [p.prefix for p in getPlugins(IStreamServerEndpointStringParser, twisted.plugins)]
    assert "mtls" in prefixes


def test_mtls_endpoint_requires_client_certificates_signed_by_ca_certs(certs):
    reactor = MemoryReactor()
    endpoint = serverFromString(
        reactor,
        f"mtls:8443:privateKey={certs.path('server.key')}:certKey={certs.path('server.pem')}"
        f":caCerts={certs.path('ca.pem')}:interface=127.0.0.1:backlog=7",
    )
    endpoint.listen(Factory.forProtocol(Protocol))
    [(port, _factory, contextFactory, backlog, interface)] = reactor.sslServers
    assert (port, backlog, interface) == (8443, 7, "127.0.0.1")
    assert contextFactory.verify and contextFactory.requireCertificate
    assert len(contextFactory.caCerts) == 1


@pytest.mark.parametrize("description, expected", [
    ("mtls:8443:privateKey={d}/server.key:certKey={d}/server.pem", "needs caCerts="),
    ("mtls:8443:certKey={d}/server.pem:caCerts={d}/ca.pem", "needs privateKey="),
    ("mtls:8443:privateKey={d}/client.key:certKey={d}/server.pem:caCerts={d}/ca.pem", "does not match"),
    ("mtls:8443:privateKey={d}/server.key:certKey={d}/server.pem:caCerts={d}/server.key", "no PEM certificate"),
])
def test_bad_mtls_strings_say_what_is_wrong(certs, description, expected):
    with pytest.raises(ValueError) as caught:
        serverFromString(MemoryReactor(), description.format(d=certs.dir))
    assert expected in str(caught.value)


def test_the_endpoint_plugin_module_imports_no_reactor():
    code = (
        "import sys, twisted.plugins.ambassador_endpoints; "
        "sys.exit('twisted.internet.reactor' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


# --- the handshake gate, in memory ----------------------------------------------------


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.events.append("lost")


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())


class _MemoryEndpoint:
    """Connects the client factory to a TLS server over an iosim pump; its TLS
    layers run their write aggregation on ``clock``."""

    def __init__(self, certs: Certs, leaf: str, clock: Clock) -> None:
        from twisted.internet.ssl import PrivateCertificate

        pem = Path(certs.path(f"{leaf}.pem")).read_bytes() + Path(certs.path(f"{leaf}.key")).read_bytes()
        self.serverOptions = PrivateCertificate.loadPEM(pem).options()
        self.clock = clock
        self.pump: object = None
        self.connecting: Deferred[object] | None = None

    def connect(self, factory):  # type: ignore[no-untyped-def]
        factory._clock = self.clock
        serverFactory = TLSMemoryBIOFactory(
            self.serverOptions, False, Factory.forProtocol(_Echo), clock=self.clock
        )
        client = factory.buildProtocol(None)
        server = serverFactory.buildProtocol(None)
        self.pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False),
                            greet=False)
        return succeed(client)

    def flush(self) -> None:
        for _ in range(20):
            self.clock.advance(0)
            self.pump.pump()  # type: ignore[attr-defined]


def _gate(certs: Certs, leaf: str, serverName: str = "localhost"):  # type: ignore[no-untyped-def]
    clock = Clock()
    memory = _MemoryEndpoint(certs, leaf, clock)
    options = clientOptions(serverName, certs.path("ca.pem"))
    return VerifiedTLSEndpoint(wrapClientTLS(options, memory), route="r", upstream="m"), memory


def test_gate_connects_the_protocol_only_after_a_verified_handshake(certs):
    endpoint, memory = _gate(certs, "server")
    recorder = _Recorder()
    results: list[object] = []
    endpoint.connect(Factory.forProtocol(lambda: recorder)).addBoth(results.append)
    assert results == [] and recorder.events == []  # TCP is up, the handshake is not
    memory.flush()
    assert results == [recorder] and recorder.events == ["made"]
    recorder.transport.write(b"ping")
    memory.flush()
    assert recorder.data == b"PING"


@pytest.mark.parametrize("leaf, serverName", [
    ("untrusted", "localhost"), ("wrongname", "localhost"), ("expired", "localhost"),
    ("server", "db.internal"),
])
def test_gate_fails_a_bad_handshake_with_tls_error_that_wrote_nothing(certs, leaf, serverName):
    endpoint, memory = _gate(certs, leaf, serverName)
    recorder = _Recorder()
    results: list[Failure] = []
    endpoint.connect(Factory.forProtocol(lambda: recorder)).addErrback(results.append)
    memory.flush()
    [failure] = results
    assert failure.check(AttemptFailed)
    assert failure.value.reason == "tls-error" and failure.value.written is False
    assert recorder.events == []  # the route's protocol never saw the connection


def test_cancelling_the_gate_mid_handshake_closes_the_connection(certs):
    endpoint, memory = _gate(certs, "server")
    recorder = _Recorder()
    d = endpoint.connect(Factory.forProtocol(lambda: recorder))
    results: list[Failure] = []
    d.addErrback(results.append)
    d.cancel()
    memory.flush()
    assert results and results[0].check(Exception)
    assert memory.pump.client.transport.disconnecting  # type: ignore[attr-defined]
    assert recorder.events == []


# --- which name a [route.tls] member must carry ---------------------------------------


@pytest.mark.parametrize("upstream, serverName, hostName, expected", [
    ("tcp:10.0.0.5:5432", None, None, "10.0.0.5"),
    ("tcp:10.0.0.5:5432", None, "db.internal", "db.internal"),
    ("tcp:10.0.0.5:5432", "override.internal", "db.internal", "override.internal"),
    ("dns:db.internal:5432", None, None, "db.internal"),
    ("unix:/run/db.sock", None, None, None),
])
def test_the_name_checked_is_server_name_else_the_members_host(upstream, serverName, hostName, expected):
    from ambassador.config import TLSPolicy
    from ambassador.upstream import tlsServerName

    assert tlsServerName(upstream, TLSPolicy(serverName=serverName), hostName) == expected
