"""Live reload on SIGHUP (SPEC §7): the new configuration is applied as a diff.

The whole new file is parsed and validated first; an invalid one is logged (every
error) and counted, and the running configuration is not touched.  A valid one is
compared route by route (by name) with the running one:

- a new route binds its listen endpoint;
- a removed route stops listening and drains its work in flight (``drain_timeout``);
- a route whose listen endpoint or protocol changed binds the new endpoint, and the
  old one stops listening and drains;
- any other change keeps the listening socket: new connections get a new route
  (new settings, new resilience core) while connections already made go on with the
  old one until they close (none is cut; at shutdown they drain like the rest);
- members that stayed (same endpoint string, same TLS) are carried over as they
  are, breaker state, counters and whatever a protocol keeps on them included; so
  is the retry budget's window.

Binding comes before any change is made: if one listen endpoint fails to bind, the
reload fails as a whole, whatever it had bound is closed again and the running
configuration is untouched.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from ambassador.config import Config, ConfigError, Route
from ambassador.endpoints import listenKey
from ambassador.service import ListenFailed, RouteService

log = Logger(namespace="ambassador")

OK = "ok"
ERROR = "error"
#: How often the open connections of a changed route's old settings are counted.
SUPERSEDED_POLL = 0.25


@attrs.frozen
class ReloadPlan:
    """How a new configuration differs from the running routes, by route name.

    @ivar added: routes that are new.
    @ivar removed: names of routes that are gone.
    @ivar rebound: (old, new) pairs whose listen endpoint or protocol changed: the
        new route binds anew and the old one drains.
    @ivar changed: (old, new) pairs with other changes: the new route takes over the
        old one's listening socket.
    @ivar unchanged: names of routes left exactly as they are.
    """

    added: tuple[Route, ...] = ()
    removed: tuple[str, ...] = ()
    rebound: tuple[tuple[Route, Route], ...] = ()
    changed: tuple[tuple[Route, Route], ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.rebound or self.changed)

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("added", [r.name for r in self.added]),
            ("removed", list(self.removed)),
            ("re-bound", [new.name for _, new in self.rebound]),
            ("changed", [new.name for _, new in self.changed]),
            ("unchanged", list(self.unchanged)),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts) or "no routes"


def planReload(running: Iterable[Route], routes: Iterable[Route]) -> ReloadPlan:
    """Compare the running routes with a new configuration's routes."""
    old = {route.name: route for route in running}
    new = {route.name: route for route in routes}
    added, rebound, changed, unchanged = [], [], [], []
    for name, route in new.items():
        previous = old.get(name)
        if previous is None:
            added.append(route)
        elif previous == route:
            unchanged.append(name)
        elif previous.listen != route.listen or previous.protocol != route.protocol:
            rebound.append((previous, route))
        else:
            changed.append((previous, route))
    removed = [name for name in old if name not in new]
    return ReloadPlan(tuple(added), tuple(removed), tuple(rebound), tuple(changed), tuple(unchanged))


def carryMembers(oldCore: Any, newCore: Any) -> list[str]:
    """Give ``newCore`` the members of ``oldCore`` that stayed, state and all.

    A member stays when its endpoint string is still listed; when the route's TLS
    settings or certificate files changed, it keeps its breaker but takes the endpoint
    built from the new files (certificate rotation needs no restart).  The
    breaker of a member that stayed keeps its state and takes the new thresholds.
    The retry budget keeps its window and takes the new ratio.

    @return: the endpoint strings of the members carried over.
    """
    carried: list[str] = []
    previous = {member.upstream: member for member in oldCore.members}
    policy = newCore.route.breaker
    members = []
    # New TLS settings or rotated certificate files: the member stays (breaker and
    # all) but connects through the endpoint the new config built from the new files.
    newEndpoints = (
        oldCore.route.tls != newCore.route.tls
        or oldCore.route.tlsFingerprint != newCore.route.tlsFingerprint
    )
    for member in newCore.members:
        kept = previous.get(member.upstream)
        if kept is None:
            members.append(member)
            continue
        if newEndpoints:
            kept.endpoint = member.endpoint
        breaker = kept.breaker
        breaker.failureThreshold = policy.failureThreshold
        breaker.resetTimeout = policy.resetTimeout
        breaker.halfOpenMax = policy.halfOpenMax
        members.append(kept)
        carried.append(kept.upstream)
    newCore.members[:] = members
    adopt = getattr(newCore, "adoptDiscovered", None)
    if adopt is not None:  # dns:/srv: members found so far, till DNS answers anew
        carried += adopt(oldCore)
    budget = oldCore.budget
    budget.ratio = newCore.route.retry.budgetRatio
    budget.minPerSecond = newCore.route.retry.budgetMinPerSecond
    newCore.budget = budget
    return carried


def countReload(ambassador: Any, result: str) -> None:
    """Count a reload in ``ambassador_config_reloads_total{result}``.

    Every object in ``ambassador.observers`` (and ``ambassador.metrics``, if set)
    that has a ``configReloaded(ok: bool)`` method (``ambassador.metrics.Metrics``)
    is told; ``result`` is ``"ok"`` or ``"error"``.
    """
    seen: set[int] = set()
    for target in [getattr(ambassador, "metrics", None), *ambassador.observers]:
        if target is None or id(target) in seen:
            continue
        seen.add(id(target))
        method = getattr(target, "configReloaded", None)
        if method is not None:
            method(result == OK)


class Reloader(Service):
    """Re-reads the configuration on SIGHUP and applies it to an ``AmbassadorService``.

    @param load: reads and validates the configuration again (the same file and
        ``--route``/``--admin`` options as at start); raises ``ConfigError``.
    @param installSignal: install the SIGHUP handler when the reactor runs (False in
        unit tests, which call :meth:`reload` themselves).
    """

    def __init__(
        self, ambassador: Any, load: Callable[[], Config], reactor: Any,
        installSignal: bool = True,
    ) -> None:
        self.ambassador = ambassador
        self.load = load
        self.reactor = reactor
        self.installSignal = installSignal
        self.retiring: set[Deferred[Any]] = set()
        self.superseded: dict[RouteService, Deferred[None]] = {}
        self._busy = False
        self._again = False
        self._previousHandler: Any = None

    def privilegedStartService(self) -> None:
        """Take SIGHUP as the routes bind, not once the reactor runs: a SIGHUP sent
        as soon as "listening on" is logged would otherwise meet the default action
        and end the process.  A reload asked for before the reactor runs waits for it
        (``callFromThread`` queues)."""
        Service.privilegedStartService(self)
        if self.installSignal and self._previousHandler is None:
            self._installHandler()

    def _installHandler(self) -> None:
        # twistd -n installs no SIGHUP handler of its own.  A Python signal handler
        # runs between two bytecodes of whatever the reactor is doing: hand the work
        # to the reactor instead of doing it there.
        def onSignal(number: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        self._previousHandler = signal.signal(signal.SIGHUP, onSignal)

    def stopService(self) -> Deferred[Any]:
        """Wait for the routes that a reload retired, or whose settings it replaced, to
        finish draining."""
        Service.stopService(self)
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        waits = list(self.retiring)
        for old, done in list(self.superseded.items()):
            # bounded by the old route's drain_timeout, like every route's connections
            old.stopService()
            waits.append(done)
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True)

    def reload(self) -> Deferred[bool]:
        """Re-read and apply the configuration; fires True if it was applied.

        A SIGHUP that arrives while a reload is under way makes one more reload
        once it is done (the file may have changed again in between).
        """
        if self._busy:
            self._again = True
            return succeed(False)
        if not self.ambassador.running:
            log.warn("reload: ignored, the ambassador is stopping")
            return succeed(False)
        self._busy = True
        d = Deferred.fromCoroutine(self._reload())

        def done(result: bool) -> bool:
            self._busy = False
            if self._again:
                self._again = False
                self.reload()
            return result

        def failed(failure: Any) -> bool:
            log.failure("reload: failed unexpectedly; the running configuration is kept",
                        failure)
            countReload(self.ambassador, ERROR)
            return False

        return d.addErrback(failed).addCallback(done)

    async def _reload(self) -> bool:
        ambassador = self.ambassador
        log.info("reload: re-reading the configuration ({source})",
                 source=ambassador.config.source or "--route")
        try:
            config = self.load()
        except ConfigError as e:
            for error in e.errors:
                log.error("reload: {error}", error=error)
            log.error("reload: the configuration is refused ({n} errors); the running "
                      "configuration is kept", n=len(e.errors))
            countReload(ambassador, ERROR)
            return False
        running = [service.route for service in ambassador.routes.values()]
        plan = planReload(running, config.routes)
        try:
            await self._apply(config, plan)
        except ListenFailed as e:
            log.error("reload: {error}; nothing changed, the running configuration is kept",
                      error=str(e))
            countReload(ambassador, ERROR)
            return False
        self._warnFixed(config)
        ambassador.config = config
        countReload(ambassador, OK)
        log.info("reload: done ({summary})", summary=plan.summary())
        return True

    def _warnFixed(self, config: Config) -> None:
        """Settings a reload does not apply: say so rather than ignore them silently."""
        current = self.ambassador.config
        if config.admin != current.admin:
            log.warn("reload: the admin endpoint changed ({old} -> {new}); it takes effect "
                     "only after a restart", old=current.admin, new=config.admin)
        if config.dns != current.dns:
            log.warn("reload: [dns] changed; it takes effect only after a restart")

    def _newRouteService(self, route: Route, previous: Any = None) -> RouteService:
        ambassador = self.ambassador
        service = RouteService(route, ambassador.protocols[route.protocol], self.reactor,
                               ambassador.observers)
        if previous is not None:
            carried = carryMembers(previous.core, service.core)
            if carried:
                log.info("route {route}: members kept with their breaker state: {members}",
                         route=route.name, members=" ".join(carried))
        return service

    async def _apply(self, config: Config, plan: ReloadPlan) -> None:
        ambassador = self.ambassador
        routes = ambassador.routes
        toBind = [self._newRouteService(route) for route in plan.added]
        toBind += [self._newRouteService(new, routes[old.name]) for old, new in plan.rebound]
        takeovers = [(routes[old.name], self._newRouteService(new, routes[old.name]))
                     for old, new in plan.changed]

        # Listeners that go away anyway, by what they hold: a new route that wants
        # the same port must wait until it is free.
        leaving = [routes[name] for name in plan.removed]
        leaving += [routes[old.name] for old, _ in plan.rebound]
        held = {listenKey(s.route.listen): s for s in leaving if s.port is not None}
        bound: list[RouteService] = []
        freed: list[RouteService] = []
        try:
            later = []
            for service in toBind:
                if listenKey(service.route.listen) in held:
                    later.append(service)
                else:
                    service.privilegedStartService()
                    bound.append(service)
            if later:
                for service in later:
                    old = held[listenKey(service.route.listen)]
                    freed.append(old)
                    port, old.port = old.port, None
                    await _maybe(port.stopListening())
                for service in later:
                    service.privilegedStartService()
                    bound.append(service)
        except Exception as e:
            # ListenFailed, or anything an endpoint raises while binding: undo it all.
            for service in bound:
                if service.port is not None:
                    await _maybe(service.port.stopListening())
                    service.port = None
                service.listening = False
            for old in freed:
                self._relisten(old)
            if isinstance(e, ListenFailed):
                raise
            raise ListenFailed(f"cannot bind the new listeners: {e}") from e

        # Everything is bound: from here on nothing fails.
        for old, new in takeovers:
            self._takeOver(old, new)
        # Listeners that go away are closed before the reload reports itself done
        # (stopListening closes the socket on the reactor's next turn, not at once).
        for old in leaving:
            if old.port is not None:
                port, old.port = old.port, None
                old.listening = False
                await _maybe(port.stopListening())
        for name in plan.removed:
            self._retire(routes.pop(name), "removed")
        for old, _ in plan.rebound:
            self._retire(routes.pop(old.name), "re-bound")
        for service in bound:
            _attach(ambassador, service)
            routes[service.route.name] = service

    def _takeOver(self, old: RouteService, new: RouteService) -> None:
        """``new`` serves the connections that ``old``'s port accepts from now on."""
        ambassador = self.ambassador
        new.switch = old.switch
        replaced = new.switch.switch(new.factory)
        new.port, old.port = old.port, None
        new.listening = True
        del ambassador.routes[old.route.name]
        _detach(ambassador, old)
        self._supersede(old, replaced)
        _attach(ambassador, new)
        ambassador.routes[new.route.name] = new
        log.info("route {route}: new connections get the new settings", route=new.route.name)

    def _supersede(self, old: RouteService, factory: Any) -> None:
        """A changed route's old connections are not cut by the reload.

        The old factory is stopped at once, as when a route stops listening (``doStop``:
        the port no longer uses it), or by its ``handOver()`` if it has one: a protocol
        with keep-alive connections closes them there gracefully (line: idle ones now,
        busy ones after the answers under way; http's ``handOver``: each answers the
        app's next request with ``connection: close``), so the app's next request
        arrives on a new connection, with the new settings.  A tcp pair lives on, on its old settings, until it closes (it
        may be a database session of hours).  At shutdown, whatever is left drains
        like any route's connections (``stopService``).
        """
        log.info("route {route} (changed): {n} open connections stay on the old settings "
                 "until they close", route=old.route.name, n=old.core.activeConnections)
        handOver = getattr(factory, "handOver", None)
        if handOver is not None:
            handOver()
        else:
            factory.doStop()
        old.stopChecks()  # the new route resolves and health-checks the members now
        done: Deferred[None] = Deferred()
        self.superseded[old] = done

        def check() -> None:
            if old.core.activeConnections > 0:
                self.reactor.callLater(SUPERSEDED_POLL, check)
                return
            del self.superseded[old]
            log.info("route {route} (changed): old settings retired", route=old.route.name)
            done.callback(None)

        check()

    def _retire(self, old: RouteService, why: str, factory: Any = None) -> None:
        """Stop ``old`` (stop listening, if it still does, and drain its connections);
        the ambassador's shutdown waits for it."""
        log.info("route {route} ({why}): draining {n} connections on the old settings",
                 route=old.route.name, why=why, n=old.core.activeConnections)
        d: Deferred[Any] = _maybeDeferred(self.ambassador.removeService(old))
        self.retiring.add(d)

        def finished(result: Any) -> Any:
            self.retiring.discard(d)
            if factory is not None:
                factory.doStop()
            log.info("route {route} ({why}): old settings retired", route=old.route.name, why=why)
            return result

        d.addBoth(finished)

    def _relisten(self, old: RouteService) -> None:
        """Bind a route again whose port a failed reload had already closed."""
        from ambassador.endpoints import withBacklog

        endpoint = serverFromString(self.reactor, withBacklog(old.route.listen))
        d = endpoint.listen(old.switch)

        def listening(port: Any) -> None:
            old.port = port

        def failed(failure: Any) -> None:
            old.listening = False
            log.error("route {route}: cannot listen on {listen} again after a failed reload: "
                      "{error}", route=old.route.name, listen=old.route.listen,
                      error=failure.getErrorMessage())

        d.addCallbacks(listening, failed)


def _attach(parent: Any, service: RouteService) -> None:
    """Add a route service that is already bound to a running parent.

    ``MultiService.addService`` would run ``privilegedStartService`` (bind) again.
    """
    service.parent = parent
    parent.services.append(service)
    parent.namedServices[service.name] = service
    if parent.running:
        service.startService()


def _detach(parent: Any, service: RouteService) -> None:
    """Take a route service out of its parent without stopping it."""
    parent.services.remove(service)
    del parent.namedServices[service.name]
    service.parent = None


def _maybeDeferred(result: Any) -> Deferred[Any]:
    return result if isinstance(result, Deferred) else succeed(result)


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result
