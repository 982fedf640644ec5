"""The service tree: one RouteService per route under an AmbassadorService."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ambassador.config import Config, DNSConfig, Route
from ambassador.discovery import endpointString
from ambassador.endpoints import withBacklog
from ambassador.resilience.core import RouteCore, isDiscovered
from ambassador.upstream import memberEndpoint

log = Logger(namespace="ambassador")


class ListenFailed(Exception):
    """A route (or the admin endpoint) could not bind its listen endpoint."""


class RouteService(Service):
    """Listens for one route and drains its connections when stopped."""

    def __init__(self, route: Route, plugin: Any, reactor: Any, observers: list[Any]) -> None:
        self.route = route
        self.name = route.name
        self.reactor = reactor

        def endpointFor(upstream: str, hostName: str | None = None) -> Any:
            # hostName: the DNS name behind a dns:/srv: member, to verify with TLS
            return memberEndpoint(reactor, endpointString(upstream), route.tls,
                                  route=route.name, hostName=hostName)

        self.core = RouteCore(route, reactor, endpointFor, observers)
        #: DNS discovery and active health checks (children started with the route).
        self.discovery: Any = None
        self.health: Any = None
        self.factory = plugin.buildFactory(route, self.core, reactor)
        self.core.retiredHooks.append(self._memberRetired)
        # The port listens with a switch, so that a reload can hand the same listening
        # socket to a changed route's new factory (ambassador.reload).
        self.switch = SwitchFactory(self.factory)
        self.port: Any = None
        self.listening = False

    def privilegedStartService(self) -> None:
        """Bind now, synchronously where the endpoint allows, so that a port in use
        stops the process before it reports itself started."""
        Service.privilegedStartService(self)
        endpoint = serverFromString(self.reactor, withBacklog(self.route.listen))
        failures: list[Any] = []
        d = endpoint.listen(self.switch)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ListenFailed(
                f'route "{self.route.name}": cannot listen on {self.route.listen}: '
                f"{failures[0].getErrorMessage()}"
            )

    def _memberRetired(self, member: Any) -> None:
        """Discovery dropped ``member``: a protocol that pools member connections
        closes them once idle, if its factory offers ``memberRetired(member)``
        (without it, they close on the pool's own idle_timeout sweep)."""
        retire = getattr(self.factory, "memberRetired", None)
        if retire is not None:
            retire(member)

    def startService(self) -> None:
        """Start discovery (``dns:``/``srv:`` upstreams) and health checks
        (``[route.health]``); the resolver is the ambassador's (``[dns]``), one for all
        routes."""
        Service.startService(self)
        from ambassador.discovery import Discovery
        from ambassador.health import HealthChecks

        if self.discovery is None and any(isDiscovered(u) for u in self.route.upstreams):
            self.discovery = Discovery(self.core, resolverOf(self.parent, self.reactor),
                                       self.reactor, _dnsConfig(self.parent).refresh)
        if self.health is None and self.route.health is not None:
            self.health = HealthChecks(self.core, self.route, self.reactor)
        for child in (self.discovery, self.health):
            if child is not None and not child.running:
                child.startService()

    def stopChecks(self) -> None:
        """Stop discovery and health checks: the route stopped, or a reload handed
        its members to a new route (which resolves and checks them from now on)."""
        for child in (self.discovery, self.health):
            if child is not None and child.running:
                child.stopService()

    def _listening(self, port: Any) -> None:
        self.port = port
        self.listening = True
        log.info("route {route}: {protocol} listening on {listen} -> {upstreams}",
                 route=self.route.name, protocol=self.route.protocol, listen=self.route.listen,
                 upstreams=" ".join(self.route.upstreams))

    def stopService(self) -> Deferred[None]:
        """Stop accepting, give work in flight ``drain_timeout``, then close the rest."""
        Service.stopService(self)
        self.listening = False
        self.stopChecks()
        stopped: Deferred[Any] = succeed(None)
        if self.port is not None:
            stopped = Deferred.fromCoroutine(_wait(self.port.stopListening()))
        return stopped.addCallback(lambda _: self._drain())

    def _drain(self) -> Deferred[None]:
        core = self.core
        if core.activeConnections == 0:
            return succeed(None)
        log.info("route {route}: draining {n} connections for up to {t}s",
                 route=self.name, n=core.activeConnections, t=self.route.drainTimeout)
        done: Deferred[None] = Deferred()
        started = self.reactor.seconds()

        def check() -> None:
            if core.activeConnections == 0:
                done.callback(None)
            elif self.reactor.seconds() - started >= self.route.drainTimeout:
                for connection in list(core.connections):
                    abort = getattr(connection, "abort", None)
                    if abort is not None:
                        abort()
                    else:
                        connection.transport.abortConnection()
                done.callback(None)
            else:
                self.reactor.callLater(0.05, check)

        check()
        return done


def _dnsConfig(ambassador: Any) -> DNSConfig:
    config = getattr(ambassador, "config", None)
    return config.dns if config is not None else DNSConfig()


def resolverOf(ambassador: Any, reactor: Any) -> Any:
    """The process's one discovery resolver, built on first use from ``[dns]`` (a
    ``[dns]`` change takes effect after a restart, like the admin endpoint)."""
    from ambassador.discovery import makeResolver

    resolver = getattr(ambassador, "resolver", None)
    if resolver is None:
        resolver = makeResolver(_dnsConfig(ambassador), reactor)
        if ambassador is not None:
            ambassador.resolver = resolver
    return resolver


class SwitchFactory(Factory):
    """The factory a route's port listens with: it builds protocols with whichever
    route factory is current, so a reload swaps what new connections get without
    closing the listening socket (connections already made keep their old factory)."""

    noisy = False

    def __init__(self, current: Any) -> None:
        self.current = current

    def switch(self, factory: Any) -> Any:
        """Make ``factory`` build new connections; return the one it replaces (still
        started: stop it with ``doStop`` once its connections are gone)."""
        factory.doStart()
        previous, self.current = self.current, factory
        return previous

    def doStart(self) -> None:
        self.current.doStart()

    def doStop(self) -> None:
        self.current.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        return self.current.buildProtocol(addr)

    def logPrefix(self) -> str:
        prefix = getattr(self.current, "logPrefix", None)
        return prefix() if prefix is not None else type(self.current).__name__


async def _wait(d: Any) -> None:
    if d is not None:
        await d


#: Objects allocated between two young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def _tuneCollector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    With hundreds of pipelined requests in flight, each holding a dozen live objects,
    CPython's default thresholds made the collector walk the same live objects again
    and again: it was the largest single cost of the line route under
    ``redis-benchmark -P 16`` (~30 % of CPU, bench/README.md).  Everything built at
    start-up (config, plugins, Twisted) is frozen out of the collected generations, and
    young collections happen after 20,000 allocations instead of 700.  Garbage cycles
    are still collected.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class AmbassadorService(MultiService):
    """The whole process: every route, plus (when configured) the admin endpoint."""

    def __init__(self, config: Config, protocols: dict[str, Any], reactor: Any,
                 logObserver: Any = None) -> None:
        MultiService.__init__(self)
        self.config = config
        self.protocols = protocols  # a reload builds its new routes with these
        self.reactor = reactor
        from ambassador.resilience.core import ObserverList

        self.observers: list[Any] = ObserverList()
        self.logObserver = logObserver
        self.routes: dict[str, RouteService] = {}
        #: The DNS resolver of discovery (ambassador.service.resolverOf), built on use.
        self.resolver: Any = None
        # Metrics read the routes when scraped (they change on reload): pass a view.
        from ambassador.metrics import Metrics

        self.metrics = Metrics(lambda: [r.core for r in self.routes.values()])
        self.observers.append(self.metrics)
        self.draining = False
        for route in config.routes:
            routeService = RouteService(route, protocols[route.protocol], reactor, self.observers)
            routeService.setServiceParent(self)
            self.routes[route.name] = routeService
        self.admin: Any = None
        if config.admin is not None:
            from ambassador.admin import AdminService

            # Added after the routes: it binds after them, and a port in use exits too.
            self.admin = AdminService(config.admin, self, reactor)
            self.admin.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        MultiService.setServiceParent(self, parent)
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            # twistd starts logging after makeService, from this component (app.AppLogger).
            parent.setComponent(ILogObserver, self.logObserver)

    def privilegedStartService(self) -> None:
        from ambassador.filelimit import raiseLimit

        raiseLimit(self.config.routes)  # before binding: every route may reach max_connections
        try:
            MultiService.privilegedStartService(self)
        except ListenFailed as e:
            for routeService in self.routes.values():
                if routeService.port is not None:
                    routeService.port.stopListening()
            if self.admin is not None and self.admin.port is not None:
                self.admin.port.stopListening()
            sys.stderr.write(f"ambassador: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)

    def startService(self) -> None:
        MultiService.startService(self)
        _tuneCollector()
        from ambassador.dispatch import streamlineDispatch

        streamlineDispatch(self.reactor)
        # twistd re-raises SIGTERM/SIGINT after shutdown (app._exitWithSignal), which
        # would make a clean drain exit 143; SPEC §7 wants exit 0 after a drain.
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exitCleanly)

    def _exitCleanly(self) -> None:
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None

    def stopService(self) -> Deferred[Any]:
        """Stop every route (each drains); the admin endpoint keeps answering, /ready
        with 503, until they are all done, so probes see the drain (SPEC §7)."""
        self.draining = True
        admin = self.admin
        Service.stopService(self)
        stopped = DeferredList(
            [maybeDeferred(s.stopService) for s in reversed(list(self)) if s is not admin]
        )
        if admin is not None and admin.running:
            stopped.addBoth(lambda _: admin.stopService())
        return stopped

    @property
    def ready(self) -> bool:
        return self.running and not self.draining and all(
            r.listening and r.core.hasUsableMember for r in self.routes.values()
        )
