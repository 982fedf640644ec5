"""The admin HTTP endpoint (SPEC §6): /live, /ready, /metrics, /status.

Built on ``twisted.web``: it answers probes and scrapes a few times a minute, so the
per-request cost that rules twisted.web out for the proxy path does not matter here.
It reads the process's state (``AmbassadorService``) when asked and keeps none.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ambassador.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = Logger(namespace="ambassador")


def memberStatus(member: Any) -> dict[str, Any]:
    breaker = member.breaker
    status: dict[str, Any] = {
        "upstream": member.upstream,
        "breaker": breaker.state,  # read first: it computes open -> half-open
        "healthy": member.healthy,
        "in_flight": member.inFlight,
        "attempts": member.attempts,
        "failures": member.failures,
        "breaker_changed_at": breaker.changedAt,
    }
    if getattr(member, "source", None) is not None:  # found by dns:/srv: discovery
        status["source"] = member.source
        status["priority"] = member.priority
        status["weight"] = member.weight
    return status


def routeStatus(routeService: Any, traces: bool = False) -> dict[str, Any]:
    """One route of ``/status``; ``traces`` adds the route's last trace values."""
    route = routeService.route
    core = routeService.core
    budget = core.budget
    status: dict[str, Any] = {
        "name": route.name,
        "protocol": route.protocol,
        "listen": route.listen,
        "members": [memberStatus(m) for m in core.members],
        "budget": {
            "retries": budget.retries,
            "requests": budget.requests,
            "allowed": budget.allowed,
        },
        "active_connections": core.activeConnections,
    }
    discovery = getattr(core, "discovery", None)
    if discovery:
        # dns:/srv: upstreams: ok | empty | failed (last good members kept) | pending
        status["discovery"] = [state.asJSON() for state in discovery.values()]
    if traces:
        status["traces"] = list(core.traces)
    return status


class AdminResource(Resource):
    """Every admin path; reads ``ambassador`` (an ``AmbassadorService``) per request.

    @param ambassador: has ``ready`` (bool), ``routes`` (name -> RouteService with
        ``route`` and ``core``) and ``metrics`` (``ambassador.metrics.Metrics``).
    """

    isLeaf = True

    def __init__(self, ambassador: Any) -> None:
        Resource.__init__(self)
        self.ambassador = ambassador

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, "method not allowed\n")
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/live":
            return self._text(request, "live\n")
        if path == b"/ready":
            if self.ambassador.ready:
                return self._text(request, "ready\n")
            request.setResponseCode(503)
            return self._text(request, "not ready\n")
        if path == b"/metrics":
            request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
            return self.ambassador.metrics.render()  # type: ignore[no-any-return]
        if path == b"/status":
            return self._status(request)
        request.setResponseCode(404)
        return self._text(request, "not found: /live /ready /metrics /status\n")

    def _status(self, request: Request) -> bytes:
        routes = self.ambassador.routes
        names = request.args.get(b"route") if request.args else None
        if names:
            name = names[0].decode("utf-8", "replace")
            routeService = routes.get(name)
            if routeService is None:
                request.setResponseCode(404)
                return self._json(request, {"error": f"no route named {name!r}"})
            return self._json(request, {"routes": [routeStatus(routeService, traces=True)]})
        return self._json(request, {"routes": [routeStatus(r) for r in routes.values()]})

    @staticmethod
    def _text(request: Request, text: str) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text.encode()

    @staticmethod
    def _json(request: Request, value: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, indent=1).encode() + b"\n"


class _QuietSite(Site):
    """Probes and scrapes every few seconds are not worth a log line each."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class AdminService(Service):
    """Listens on the admin endpoint; binds in privilegedStartService like the routes,
    so a port in use stops the process before it reports itself started."""

    # No service name: routes are named services, and a route may be called "admin".

    def __init__(self, listen: str, ambassador: Any, reactor: Any) -> None:
        self.listen = listen
        self.reactor = reactor
        self.site = _QuietSite(AdminResource(ambassador))
        self.port: Any = None

    def privilegedStartService(self) -> None:
        from ambassador.service import ListenFailed

        Service.privilegedStartService(self)
        failures: list[Any] = []
        d = serverFromString(self.reactor, self.listen).listen(self.site)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ListenFailed(
                f"admin: cannot listen on {self.listen}: {failures[0].getErrorMessage()}"
            )

    def _listening(self, port: Any) -> None:
        self.port = port
        log.info("admin listening on {listen}", listen=self.listen)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d = port.stopListening()
        return d if d is not None else succeed(None)
