"""DNS discovery of members: ``dns:HOST:PORT`` and ``srv:NAME`` upstreams (SPEC §2).

Every A/AAAA address of HOST is one member; every SRV target of NAME is one member,
with the record's priority and weight (the route core honours both).  Each name is
asked again on its records' TTL, and at least every ``[dns] refresh``.

What an answer does to the member set:

- records: they become the member set (``RouteCore.setDiscovered``: members that
  stayed keep their breaker and connections, new ones join, vanished ones retire);
- an empty answer (NXDOMAIN, or no record of the type): the set becomes empty, the
  route answers ``no-upstream``; asked again after ``refresh``;
- a failure (timeout, SERVFAIL, refused, ...): the last good set is kept, and the
  log and ``/status`` say so; asked again soon (``FAILED_RETRY``, at most refresh).

The resolver (``makeResolver``) asks ONLY the configured ``[dns] servers`` when there
are any: ``twisted.names.client.createResolver(servers=...)`` would also read the
system's resolv.conf and ask its servers (TWISTED-NOTES), so we build the plain
``client.Resolver`` with no resolv.conf instead.  Without ``[dns] servers`` it is the
system's resolver (``/etc/hosts``, then resolv.conf).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from ambassador.endpoints import checkDiscoveredMember
from ambassador.resilience.core import isDiscovered

log = Logger(namespace="ambassador")

#: Query timeouts (seconds, one per try): a dead server costs ~3 s, not 60 s.
QUERY_TIMEOUT = (1, 2)
#: A failed answer is asked again after this long (or refresh, if shorter).
FAILED_RETRY = 5.0
#: The shortest re-resolution interval, whatever the TTL (a TTL of 0 must not spin).
MIN_INTERVAL = 1.0

OK, EMPTY, FAILED, PENDING = "ok", "empty", "failed", "pending"


def makeResolver(dnsConfig: Any, reactor: Any) -> Any:
    """The resolver for discovery: only ``dnsConfig.servers`` when set, else the system's.

    @param dnsConfig: ``ambassador.config.DNSConfig``.
    """
    from twisted.names import cache, client, hosts, resolve

    if dnsConfig.servers:
        # resolv=None: no resolv.conf is read, so these are the only servers asked
        # (UDP, and TCP for truncated answers, both through pickServer()).
        return client.Resolver(
            resolv=None, servers=[tuple(s) for s in dnsConfig.servers],
            timeout=QUERY_TIMEOUT, reactor=reactor,
        )
    # client.createResolver() would do, but on the global reactor: the same chain here.
    return resolve.ResolverChain([
        hosts.Resolver(b"/etc/hosts"),
        cache.CacheResolver(reactor=reactor),
        client.Resolver(resolv=b"/etc/resolv.conf", timeout=QUERY_TIMEOUT, reactor=reactor),
    ])


@attrs.define
class SourceState:
    """What ``/status`` shows of one ``dns:``/``srv:`` upstream."""

    source: str
    state: str = PENDING
    members: tuple[str, ...] = ()
    error: str | None = None
    resolvedAt: float | None = None  # Unix time of the last answer (good or empty)
    failedAt: float | None = None
    ttl: float | None = None
    servers: tuple[str, ...] = ()  # who is asked: HOST:PORT each, or "system"

    def asJSON(self) -> dict[str, Any]:
        return {
            "upstream": self.source, "state": self.state, "members": list(self.members),
            "error": self.error, "resolved_at": self.resolvedAt, "failed_at": self.failedAt,
            "ttl": self.ttl, "servers": list(self.servers),
        }


def resolverServers(resolver: Any) -> tuple[str, ...]:
    """The servers a resolver built by ``makeResolver`` asks (for ``/status``)."""
    if not hasattr(resolver, "servers"):
        return ("system",)  # /etc/hosts, then resolv.conf's servers
    servers = list(resolver.servers) + list(getattr(resolver, "dynServers", ()) or ())
    return tuple(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in servers)


def memberString(address: str, port: int) -> tuple[str, str]:
    """(the metrics label ``tcp:ADDRESS:PORT``, the endpoint string to connect to)."""
    if ":" in address:  # IPv6: Twisted's tcp: client connects to an IPv6 literal too
        escaped = address.replace(":", "\\:")
        return f"tcp:[{address}]:{port}", f"tcp:host={escaped}:port={port}"
    return f"tcp:{address}:{port}", f"tcp:{address}:{port}"


def endpointString(upstream: str) -> str:
    """The endpoint string of a member label (``tcp:[ADDRESS]:PORT`` is not one)."""
    if upstream.startswith("tcp:["):
        address, _, port = upstream[5:].rpartition("]:")
        return memberString(address, int(port))[1]
    return upstream


class Discovery(Service):
    """Keeps a route core's discovered members in step with DNS.

    @param core: the route's ``RouteCore``.
    @param resolver: an ``IResolver`` (``makeResolver``).
    @param clock: ``IReactorTime``.
    @param refresh: ``[dns] refresh``.
    """

    def __init__(self, core: Any, resolver: Any, clock: Any, refresh: float) -> None:
        self.core = core
        self.resolver = resolver
        self.clock = clock
        self.refresh = refresh
        self.sources = [u for u in core.route.upstreams if isDiscovered(u)]
        self.timers: dict[str, Any] = {}  # IDelayedCall
        self.pending: dict[str, Deferred[Any]] = {}
        servers = resolverServers(resolver)
        for source in self.sources:
            core.discovery.setdefault(source, SourceState(source)).servers = servers

    def startService(self) -> None:
        Service.startService(self)
        for source in self.sources:
            self.resolve(source)

    def stopService(self) -> None:
        Service.stopService(self)
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        self.timers.clear()
        for d in list(self.pending.values()):
            d.cancel()
        self.pending.clear()

    def resolve(self, source: str) -> Deferred[Any]:
        """Ask DNS about ``source`` now; the answer schedules the next time."""
        self.timers.pop(source, None)
        kind, name, port = checkDiscoveredMember(source)
        d = self._lookupAddresses(name, port) if kind == "dns" else self._lookupService(name)
        self.pending[source] = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(source,), errbackArgs=(source,))
        return d

    def _schedule(self, source: str, delay: float) -> None:
        if self.running:
            delay = max(MIN_INTERVAL, min(delay, self.refresh))
            self.timers[source] = self.clock.callLater(delay, self.resolve, source)

    def _answered(self, answer: tuple[list[tuple[str, str | None, int, int]], float | None],
                  source: str) -> None:
        self.pending.pop(source, None)
        found, ttl = answer
        state = self.core.discovery[source]
        added, removed = self.core.setDiscovered(source, found)
        state.state = OK if found else EMPTY
        state.members = tuple(upstream for upstream, _, _, _ in found)
        state.error = None
        state.ttl = ttl
        state.resolvedAt = time.time()
        if added or removed:
            log.info("route {route}: {source} -> {members} (added: {added}; removed: {removed})",
                     route=self.core.name, source=source,
                     members=" ".join(state.members) or "no member",
                     added=" ".join(m.upstream for m in added) or "none",
                     removed=" ".join(m.upstream for m in removed) or "none")
        if not found:
            log.warn("route {route}: {source} has no record; the route answers no-upstream "
                     "for it", route=self.core.name, source=source)
        self._schedule(source, ttl if ttl is not None and found else self.refresh)

    def _failed(self, failure: Failure, source: str) -> None:
        self.pending.pop(source, None)
        if not self.running:
            return
        state = self.core.discovery[source]
        state.state = FAILED
        state.error = _describe(failure)
        state.failedAt = time.time()
        log.warn("route {route}: resolving {source} failed ({error}); keeping the last good "
                 "members: {members}", route=self.core.name, source=source, error=state.error,
                 members=" ".join(state.members) or "none")
        self._schedule(source, FAILED_RETRY)

    # --- lookups ----------------------------------------------------------------------

    def _lookupAddresses(self, name: str, port: int | None) -> Deferred[Any]:
        """Every A and AAAA address of ``name``: one member each."""
        assert port is not None
        queries = [self.resolver.lookupAddress(name), self.resolver.lookupIPV6Address(name)]
        d = DeferredList(queries, consumeErrors=True)

        def combine(results: list[tuple[bool, Any]]) -> Any:
            records, ttl = _records(results, (dns.A, dns.AAAA))
            found = []
            for record in records:
                label, _ = memberString(record.payload.dottedQuad() if record.type == dns.A
                                        else _ipv6(record), port)
                found.append((label, name, 0, 1))
            return _unique(found), ttl

        return d.addCallback(combine)

    def _lookupService(self, name: str) -> Deferred[Any]:
        """Every SRV target of ``name``: one member each (its first address; the
        additional section when the server gave one, else an A/AAAA lookup)."""
        d = self.resolver.lookupService(name)

        def targets(result: Any) -> Any:
            answers, _authority, additional = result
            srvs = [r for r in answers if r.type == dns.SRV and str(r.payload.target) != "."]
            ttl = min((r.ttl for r in answers if r.type == dns.SRV), default=None)
            known: dict[str, list[str]] = {}
            for r in additional:
                if r.type == dns.A:
                    known.setdefault(str(r.name).lower(), []).append(r.payload.dottedQuad())
            lookups = []
            for r in srvs:
                target = str(r.payload.target)
                if target.lower() in known:
                    lookups.append(_succeeded(known[target.lower()]))
                else:
                    lookups.append(self._addressesOf(target))
            gathered = DeferredList(lookups, consumeErrors=True, fireOnOneErrback=True)

            def build(results: list[tuple[bool, Any]]) -> Any:
                found = []
                for record, (_, addresses) in zip(srvs, results):
                    if not addresses:
                        continue  # a target without address is no member
                    label, _ = memberString(addresses[0], record.payload.port)
                    found.append((label, str(record.payload.target), record.payload.priority,
                                  record.payload.weight))
                return _unique(found), ttl

            def unwrap(failure: Failure) -> Failure:
                return failure.value.subFailure if hasattr(failure.value, "subFailure") else failure

            return gathered.addCallbacks(build, unwrap)

        def negative(failure: Failure) -> Any:
            if not isNegative(failure):
                return failure
            return [], None

        return d.addCallbacks(targets, negative)

    def _addressesOf(self, target: str) -> Deferred[list[str]]:
        queries = [self.resolver.lookupAddress(target), self.resolver.lookupIPV6Address(target)]

        def combine(results: list[tuple[bool, Any]]) -> list[str]:
            records, _ = _records(results, (dns.A, dns.AAAA))
            return [r.payload.dottedQuad() if r.type == dns.A else _ipv6(r) for r in records]

        return DeferredList(queries, consumeErrors=True).addCallback(combine)


def _records(results: list[tuple[bool, Any]], types: tuple[int, ...]) -> tuple[list[Any], float | None]:
    """The records of the given types from several lookups, and their smallest TTL.

    A negative answer (NXDOMAIN) counts as no record; any other failure fails the
    whole answer, so that the last good member set is kept.
    """
    records: list[Any] = []
    for ok, value in results:
        if ok:
            answers = value[0]
            records += [r for r in answers if r.type in types]
        elif not isNegative(value):
            value.raiseException()
    ttl = min((r.ttl for r in records), default=None)
    # A before AAAA: IPv4 first for srv: targets that have both.
    records.sort(key=lambda r: types.index(r.type))
    return records, ttl


def isNegative(failure: Failure) -> bool:
    """Is this a negative answer (the name does not exist), not a failure to answer?

    NXDOMAIN is ``DNSNameError`` from a server, ``AuthoritativeDomainError`` from an
    authority (/etc/hosts), a bare ``DomainError`` from a resolver chain that found
    nothing; SERVFAIL, REFUSED and the like are ``DomainError`` subclasses too, but
    they say nothing about the name.
    """
    return failure.type in (error.DNSNameError, error.AuthoritativeDomainError, error.DomainError)


def _ipv6(record: Any) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, record.payload.address)


def _unique(found: list[Any]) -> list[tuple[str, str | None, int, int]]:
    seen: set[str] = set()
    unique = []
    for entry in found:
        if entry[0] not in seen:
            seen.add(entry[0])
            unique.append(entry)
    return unique


def _succeeded(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


def _describe(failure: Failure) -> str:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    if failure.check(error.DNSQueryTimeoutError, DeferredTimeout):
        return "timeout"
    if failure.check(error.DNSServerError):
        return "server failure (SERVFAIL)"
    if failure.check(error.DNSQueryRefusedError):
        return "refused"
    return failure.getErrorMessage() or type(failure.value).__name__
