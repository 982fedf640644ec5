"""The reload's diff, on a fake reactor: what is kept, what is replaced, what rolls back."""

from __future__ import annotations

from pathlib import Path

import trustme
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from ambassador.config import loadConfig
from ambassador.reload import Reloader, carryMembers, planReload
from ambassador.service import AmbassadorService


class _Port:
    def __init__(self, reactor: ListeningReactor, port: int, factory: object) -> None:
        self.reactor, self.port, self.factory = reactor, port, factory

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.reactor.listening.pop(self.port, None)


class ListeningReactor(MemoryReactorClock):
    """Knows which ports listen, and refuses a port in use like the kernel does."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: dict[int, _Port] = {}
        self.busy: set[int] = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):  # type: ignore[override]
        if port in self.listening or port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.listening[port] = _Port(self, port, factory)
        return self.listening[port]


def route(name: str, port: int, *members: str, extra: str = "") -> str:
    upstreams = ", ".join(f'"{m}"' for m in members)
    return (f'[[route]]\nname = "{name}"\nprotocol = "tcp"\nlisten = "tcp:{port}"\n'
            f"upstreams = [{upstreams}]\n{extra}\n")


class Counting:
    """An observer that only counts reloads (what Metrics.configReloaded receives)."""

    def __init__(self) -> None:
        self.reloads: list[bool] = []

    def configReloaded(self, ok: bool) -> None:
        self.reloads.append(ok)

    def __getattr__(self, name):  # the other IRouteObserver events: ignored
        return lambda *args: None


class Running:
    """An AmbassadorService with a Reloader, started on a ListeningReactor."""

    def __init__(self, tmp: Path, config: str) -> None:
        self.path = tmp / "ambassador.toml"
        self.path.write_text(config)
        self.reactor = ListeningReactor()
        self.service = AmbassadorService(self.load(), _protocols(), self.reactor)
        self.counting = Counting()
        self.service.observers.append(self.counting)
        self.reloader = Reloader(self.service, self.load, self.reactor, installSignal=False)
        self.reloader.setServiceParent(self.service)
        self.service.privilegedStartService()
        self.service.startService()

    def load(self):
        return loadConfig(str(self.path), admin="none", protocols=_protocols())

    def reload(self, config: str) -> bool:
        self.path.write_text(config)
        results: list[bool] = []
        self.reloader.reload().addCallback(results.append)
        assert results, "the reload did not finish on the fake reactor"
        return results[0]


def _protocols():
    from ambassador.protocols.tcp import tcpProtocol

    return {"tcp": tcpProtocol}


M1, M2, M3 = "tcp:127.0.0.1:7001", "tcp:127.0.0.1:7002", "tcp:127.0.0.1:7003"


def test_the_plan_sorts_routes_by_what_changed(tmp_path):
    old = loadConfig(None, ["tcp tcp:7100 tcp:127.0.0.1:1", "tcp tcp:7101 tcp:127.0.0.1:1",
                            "tcp tcp:7102 tcp:127.0.0.1:1", "tcp tcp:7103 tcp:127.0.0.1:1"],
                     admin="none", protocols=_protocols()).routes
    new = loadConfig(None, ["tcp tcp:7100 tcp:127.0.0.1:1", "tcp tcp:7201 tcp:127.0.0.1:1",
                            "tcp tcp:7102 tcp:127.0.0.1:2", "tcp tcp:7103 tcp:127.0.0.1:1",
                            "tcp tcp:7104 tcp:127.0.0.1:1"],
                     admin="none", protocols=_protocols()).routes
    plan = planReload(old, new[:4] + new[4:])
    assert [r.name for r in plan.added] == ["tcp-5"]
    assert plan.removed == ()
    assert [n.name for _, n in plan.rebound] == ["tcp-2"]
    assert [n.name for _, n in plan.changed] == ["tcp-3"]
    assert plan.unchanged == ("tcp-1", "tcp-4")
    assert planReload(old, new[:1]).removed == ("tcp-2", "tcp-3", "tcp-4")
    assert planReload(old, old).empty


def test_a_changed_route_keeps_its_socket_and_new_connections_get_the_new_core(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1, M2))
    old = running.service.routes["a"]
    port = old.port
    connection = port.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert connection.core is old.core

    assert running.reload(route("a", 7000, M1, M2, extra="[route.retry]\nattempts = 5"))
    new = running.service.routes["a"]
    assert new is not old and new.port is port and running.reactor.listening[7000] is port
    assert new.route.retry.attempts == 5
    assert port.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50001)).core is new.core
    assert connection.core is old.core  # a connection made before finishes on the old route
    assert list(running.service).count(old) == 0 and new in list(running.service)
    assert running.counting.reloads == [True]


def test_members_that_stayed_keep_their_breaker_state_and_new_members_start_closed(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1, M2))
    core = running.service.routes["a"].core
    m1, m2 = core.members
    for _ in range(5):
        m1.breaker.acquire()
        m1.breaker.failure()
    assert m1.breaker.state == "open"

    assert running.reload(route("a", 7000, M1, M3, extra="[route.breaker]\nfailure_threshold = 9"))
    members = running.service.routes["a"].core.members
    assert members[0] is m1 and m1.breaker.state == "open"
    assert m1.breaker.failureThreshold == 9
    assert members[1] is not m2 and members[1].upstream == M3 and members[1].breaker.state == "closed"


def test_a_member_keeps_its_breaker_but_takes_the_new_endpoint_when_the_route_tls_changed(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1))
    old = running.service.routes["a"].core
    oldEndpoint = old.members[0].endpoint
    cert = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(cert))
    assert running.reload(route("a", 7000, M1, extra=f'[route.tls]\ntrust_roots = "{cert}"'))
    member = running.service.routes["a"].core.members[0]
    assert member is old.members[0]
    assert member.endpoint is not oldEndpoint


def test_a_rotated_certificate_file_makes_the_route_change_and_renews_the_endpoint(tmp_path):
    cert = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(cert))
    config = route("a", 7000, M1, extra=f'[route.tls]\ntrust_roots = "{cert}"')
    running = Running(tmp_path, config)
    old = running.service.routes["a"].core
    oldEndpoint = old.members[0].endpoint
    trustme.CA().cert_pem.write_to_path(str(cert))  # same path, new contents
    assert running.reload(config)
    new = running.service.routes["a"].core
    assert new.route.tlsFingerprint != old.route.tlsFingerprint
    assert new.members[0] is old.members[0]
    assert new.members[0].endpoint is not oldEndpoint


def test_added_removed_and_rebound_routes(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1) + route("b", 7001, M1) + route("c", 7002, M1))
    b = running.service.routes["b"]
    assert running.reload(route("a", 7000, M1) + route("c", 7003, M1) + route("d", 7001, M1))
    routes = running.service.routes
    assert sorted(routes) == ["a", "c", "d"]
    assert sorted(running.reactor.listening) == [7000, 7001, 7003]
    assert routes["d"].port is running.reactor.listening[7001]  # b's port, freed first
    assert not b.running


def test_a_port_in_use_fails_the_whole_reload_and_nothing_changes(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1) + route("b", 7001, M1) + route("c", 7002, M1))
    before = dict(running.service.routes)
    ports = dict(running.reactor.listening)
    running.reactor.busy.add(7009)
    ok = running.reload(route("a", 7000, M2) + route("x", 7005, M1) + route("y", 7002, M1)
                        + route("c", 7008, M1) + route("z", 7009, M1))
    assert not ok
    assert running.service.routes == before
    assert sorted(running.reactor.listening) == sorted(ports)
    # c's port was given up for y and is listening again (a new port object)
    assert running.service.routes["c"].port is running.reactor.listening[7002]
    assert running.counting.reloads == [False]


def test_an_invalid_file_changes_nothing_and_is_counted(tmp_path):
    running = Running(tmp_path, route("a", 7000, M1))
    before = dict(running.service.routes)
    config = running.service.config
    assert not running.reload(route("a", 7000, M1, extra="bogus = 1"))
    assert running.service.routes == before and running.service.config is config
    assert running.counting.reloads == [False]
