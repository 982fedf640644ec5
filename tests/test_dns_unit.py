"""DNS discovery on a fake resolver and a Clock: member sets, TTLs, failures (SPEC §2)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns, error

from ambassador.admin import routeStatus
from ambassador.config import DNSConfig, Route
from ambassador.discovery import Discovery, endpointString, makeResolver
from ambassador.endpoints import EndpointError, checkClientEndpoint
from ambassador.resilience.core import RouteCore
from ambassador.resilience.reasons import RequestFailed


def a(name: str, address: str, ttl: int = 10) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(address, ttl))


def srv(name: str, priority: int, weight: int, port: int, target: str, ttl: int = 10) -> dns.RRHeader:
    return dns.RRHeader(name, dns.SRV, ttl=ttl, payload=dns.Record_SRV(priority, weight, port, target, ttl))


class FakeResolver:
    """Answers from ``records`` (name -> list of RRHeader, or an exception to fail with);
    a name not there is NXDOMAIN.  Counts the lookups."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.asked: list[tuple[str, str]] = []
        self.hold = False
        self.held: list[Deferred[Any]] = []

    def _answer(self, name: str, kind: int, label: str) -> Deferred[Any]:
        self.asked.append((name, label))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            return d
        entry = self.records.get(name)
        if entry is None:
            return fail(error.DNSNameError(name))
        if isinstance(entry, Exception):
            return fail(entry)
        return succeed(([r for r in entry if r.type == kind], [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.A, "A")

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.AAAA, "AAAA")

    def lookupService(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.SRV, "SRV")


def makeCore(upstreams: tuple[str, ...], balance: str = "round_robin", clock: Clock | None = None) -> RouteCore:
    route = Route(name="r", protocol="tcp", listen="tcp:1", upstreams=upstreams, balance=balance)
    built: list[tuple[str, Any]] = []

    def endpointFor(upstream: str, hostName: str | None = None) -> Any:
        built.append((upstream, hostName))
        return object()

    core = RouteCore(route, clock or Clock(), endpointFor)
    core.built = built  # type: ignore[attr-defined]
    return core


def started(core: RouteCore, resolver: FakeResolver, clock: Clock, refresh: float = 30.0) -> Discovery:
    discovery = Discovery(core, resolver, clock, refresh)
    discovery.startService()
    return discovery


def upstreams(core: RouteCore) -> list[str]:
    return [m.upstream for m in core.members]


def test_every_A_record_is_one_member_labelled_tcp_address_port():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1"), a("svc.test", "10.0.0.2")]
    core = makeCore(("dns:svc.test:6379",), clock=clock)
    assert core.members == []
    started(core, resolver, clock)
    assert upstreams(core) == ["tcp:10.0.0.1:6379", "tcp:10.0.0.2:6379"]
    # the DNS name goes with the member (TLS verification, Host headers)
    assert core.built == [("tcp:10.0.0.1:6379", "svc.test"), ("tcp:10.0.0.2:6379", "svc.test")]
    assert all(m.hostName == "svc.test" and m.source == "dns:svc.test:6379" for m in core.members)


def test_static_and_discovered_members_live_side_by_side():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1")]
    core = makeCore(("tcp:127.0.0.1:1", "dns:svc.test:80"), clock=clock)
    started(core, resolver, clock)
    assert upstreams(core) == ["tcp:127.0.0.1:1", "tcp:10.0.0.1:80"]


def test_asked_again_on_the_ttl_and_a_vanished_record_leaves_while_the_others_keep_state():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", f"10.0.0.{i}", ttl=3) for i in (1, 2, 3)]
    core = makeCore(("dns:svc.test:80",), clock=clock)
    retired: list[Any] = []
    core.retiredHooks.append(retired.append)
    started(core, resolver, clock)
    first, second, third = core.members
    for _ in range(5):
        second.breaker.failure()
    assert second.breaker.state == "open"
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.2", ttl=3), a("svc.test", "10.0.0.3", ttl=3)]
    asked = len(resolver.asked)
    clock.advance(2.9)
    assert len(resolver.asked) == asked  # not before the TTL
    clock.advance(0.2)
    assert len(resolver.asked) == asked + 2  # A and AAAA
    assert core.members == [second, third]  # the same objects: breaker state kept
    assert retired == [first]  # the protocol is told, to close its pooled connections
    assert second.breaker.state == "open"
    assert first.retired and not second.retired


def test_refresh_bounds_a_long_ttl():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1", ttl=3600)]
    core = makeCore(("dns:svc.test:80",), clock=clock)
    started(core, resolver, clock, refresh=30)
    asked = len(resolver.asked)
    clock.advance(30)
    assert len(resolver.asked) == asked + 2


def test_a_failed_answer_keeps_the_last_good_members_and_says_so_in_status():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1", ttl=1)]
    core = makeCore(("dns:svc.test:80",), clock=clock)
    started(core, resolver, clock)
    resolver.records["svc.test"] = error.DNSQueryTimeoutError("svc.test")
    clock.advance(1)
    assert upstreams(core) == ["tcp:10.0.0.1:80"]
    state = core.discovery["dns:svc.test:80"]
    assert state.state == "failed" and state.error == "timeout"
    resolver.records["svc.test"] = error.DNSServerError("svc.test")  # SERVFAIL: no verdict either
    clock.advance(5)
    assert upstreams(core) == ["tcp:10.0.0.1:80"]
    assert state.state == "failed"

    class Service:
        route = core.route

    Service.core = core  # type: ignore[attr-defined]
    status = routeStatus(Service)
    assert status["discovery"][0]["state"] == "failed"
    assert status["discovery"][0]["members"] == ["tcp:10.0.0.1:80"]
    assert status["members"][0]["source"] == "dns:svc.test:80"


def test_nxdomain_empties_the_member_set_and_the_route_answers_no_upstream():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1", ttl=1)]
    core = makeCore(("dns:svc.test:80",), clock=clock)
    started(core, resolver, clock, refresh=7)
    del resolver.records["svc.test"]
    clock.advance(1)
    assert core.members == [] and not core.hasUsableMember
    assert core.discovery["dns:svc.test:80"].state == "empty"
    failures: list[Any] = []
    core.request(lambda member: succeed(None)).addErrback(failures.append)
    assert failures[0].check(RequestFailed) and failures[0].value.reason == "no-upstream"
    # a negative answer is asked again after at most refresh
    asked = len(resolver.asked)
    clock.advance(7)
    assert len(resolver.asked) == asked + 2


def test_first_resolution_failing_leaves_no_member_until_one_succeeds():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = error.DNSQueryTimeoutError("svc.test")
    core = makeCore(("dns:svc.test:80",), clock=clock)
    started(core, resolver, clock)
    assert core.members == []
    assert core.discovery["dns:svc.test:80"].state == "failed"
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.9")]
    clock.advance(5)
    assert upstreams(core) == ["tcp:10.0.0.9:80"]


def test_stop_cancels_the_timer_and_the_query_under_way():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1", ttl=1)]
    core = makeCore(("dns:svc.test:80",), clock=clock)
    discovery = started(core, resolver, clock)
    resolver.hold = True
    clock.advance(1)
    assert resolver.held
    discovery.stopService()
    assert clock.getDelayedCalls() == []
    assert all(d.called for d in resolver.held)


def srvCore(clock: Clock, resolver: FakeResolver, balance: str = "round_robin") -> RouteCore:
    name = "_svc._tcp.test"
    resolver.records[name] = [
        srv(name, 10, 3, 7001, "a.test"), srv(name, 10, 1, 7002, "b.test"),
        srv(name, 20, 1, 7003, "c.test"),
    ]
    for target, address in (("a.test", "10.0.0.1"), ("b.test", "10.0.0.2"), ("c.test", "10.0.0.3")):
        resolver.records[target] = [a(target, address)]
    core = makeCore((f"srv:{name}",), balance=balance, clock=clock)
    started(core, resolver, clock)
    return core


@pytest.mark.parametrize("balance", ["round_robin", "random", "least_request"])
def test_srv_weights_share_traffic_within_the_lowest_priority(balance):
    clock, resolver = Clock(), FakeResolver()
    core = srvCore(clock, resolver, balance)
    assert [(m.upstream, m.priority, m.weight, m.hostName) for m in core.members] == [
        ("tcp:10.0.0.1:7001", 10, 3, "a.test"), ("tcp:10.0.0.2:7002", 10, 1, "b.test"),
        ("tcp:10.0.0.3:7003", 20, 1, "c.test"),
    ]
    picks = Counter(core.balancer.pick(core.candidates(), [], None).upstream for _ in range(4000))
    assert "tcp:10.0.0.3:7003" not in picks
    ratio = picks["tcp:10.0.0.1:7001"] / picks["tcp:10.0.0.2:7002"]
    assert 2.5 < ratio < 3.6, picks


def test_srv_next_priority_only_when_every_member_of_the_lower_one_is_unusable():
    clock, resolver = Clock(), FakeResolver()
    core = srvCore(clock, resolver)
    first, second, third = core.members

    def picked() -> set[Any]:
        return {core.balancer.pick(core.candidates(), [], None) for _ in range(20)}

    assert picked() == {first, second}
    first.healthy = False
    assert picked() == {second}  # priority 20 still gets nothing
    for _ in range(5):
        second.breaker.failure()
    assert picked() == {third}
    first.healthy = True
    assert picked() == {first}


def test_reload_adopts_discovered_members_of_the_sources_that_stayed():
    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1")]
    old = makeCore(("dns:svc.test:80", "dns:gone.test:80"), clock=clock)
    started(old, resolver, clock)
    new = makeCore(("dns:svc.test:80",), clock=clock)
    assert new.adoptDiscovered(old) == ["tcp:10.0.0.1:80"]
    assert new.members == [old.members[0]]
    assert list(new.discovery) == ["dns:svc.test:80"]


def test_reload_with_new_tls_settings_rebuilds_the_adopted_members_endpoints():
    import attrs

    from ambassador.config import TLSPolicy

    clock, resolver = Clock(), FakeResolver()
    resolver.records["svc.test"] = [a("svc.test", "10.0.0.1")]
    old = makeCore(("dns:svc.test:80",), clock=clock)
    started(old, resolver, clock)
    member = old.members[0]
    before = member.endpoint
    new = makeCore(("dns:svc.test:80",), clock=clock)
    new.route = attrs.evolve(new.route, tls=TLSPolicy(serverName="svc.test"))
    new.adoptDiscovered(old)
    assert new.members == [member] and member.endpoint is not before
    assert new.built == [("tcp:10.0.0.1:80", "svc.test")]  # type: ignore[attr-defined]


def test_makeResolver_asks_only_the_configured_servers():
    from twisted.internet.testing import MemoryReactorClock

    resolver = makeResolver(DNSConfig(servers=(("127.0.0.1", 5353),)), MemoryReactorClock())
    assert resolver.servers == [("127.0.0.1", 5353)]
    assert not resolver.resolv and list(resolver.dynServers) == []
    assert resolver.pickServer() == ("127.0.0.1", 5353)


def test_ipv6_labels_and_endpoint_strings():
    assert endpointString("tcp:[::1]:80") == "tcp:host=\\:\\:1:port=80"
    assert endpointString("tcp:10.0.0.1:80") == "tcp:10.0.0.1:80"


@pytest.mark.parametrize("good", ["dns:svc.test:80", "dns:db:5432", "srv:_redis._tcp.cache.internal"])
def test_dns_and_srv_members_are_accepted(good):
    checkClientEndpoint(good)


@pytest.mark.parametrize("bad", ["dns:svc.test", "dns:svc.test:0", "dns:svc.test:http",
                                 "dns:bad name:80", "srv:", "dns::80", "srv:a..b"])
def test_malformed_dns_and_srv_members_are_refused(bad):
    with pytest.raises(EndpointError):
        checkClientEndpoint(bad)


def test_without_servers_it_is_the_systems_hosts_file_then_resolv_conf_on_our_reactor():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.names import client, hosts

    from ambassador.discovery import resolverServers

    reactor = MemoryReactorClock()
    resolver = makeResolver(DNSConfig(), reactor)
    kinds = [type(r) for r in resolver.resolvers]
    assert kinds[0] is hosts.Resolver and kinds[-1] is client.Resolver
    assert resolver.resolvers[-1]._reactor is reactor
    assert resolverServers(resolver) == ("system",)
