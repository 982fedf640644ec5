"""``upper``: an example route protocol plugin for ambassador (SPEC §9).

A route with ``protocol = "upper"`` relays each app connection to one member and
upper-cases everything the app sends.  The route's core picks the member and runs
the connect attempts (retries, breakers, deadline); the plugin only moves bytes.
"""

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import IRouteProtocol
from ambassador.resilience.core import RequestRecord


class _MemberSide(Protocol):
    def __init__(self, app: "_AppSide") -> None:
        self.app = app

    def dataReceived(self, data: bytes) -> None:
        self.app.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.app.transport.loseConnection()


class _AppSide(Protocol):
    member: Any = None  # the _MemberSide once connected
    upstream = pending = None
    attempts, result = 0, "ok"

    def __init__(self, core: Any, reactor: Any) -> None:
        self.core, self.reactor = core, reactor

    def connectionMade(self) -> None:
        self.started = self.reactor.seconds()
        if not self.core.admit(self):
            self.result = "overloaded"
            self.transport.loseConnection()
            return
        self.transport.pauseProducing()  # nothing is read before a member is there
        factory = Factory.forProtocol(lambda: _MemberSide(self))
        self.pending = self.core.request(
            lambda member: member.connect(factory, self.reactor, self.core.route.connectTimeout),
            attemptTimeout=float("inf"))
        self.pending.addCallbacks(self._connected, self._failed)

    def _connected(self, outcome: Any) -> None:
        self.member, self.attempts = outcome.value, outcome.attempts
        self.upstream = outcome.member.upstream
        self.transport.resumeProducing()

    def _failed(self, failure: Any) -> None:
        self.result = getattr(failure.value, "reason", "protocol-error")
        self.attempts = getattr(failure.value, "attempts", 0)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.member.transport.write(data.upper())

    def connectionLost(self, reason: Any = None) -> None:
        if self.pending is not None:
            self.pending.cancel()  # a no-op once connected
        if self.member is not None:
            self.member.transport.loseConnection()
        self.core.release(self)
        self.core.finished(RequestRecord(self.upstream, self.attempts, self.result,
                                         self.reactor.seconds() - self.started))


@implementer(IPlugin, IRouteProtocol)
class UpperProtocol:
    """The plugin object: ambassador finds it with getPlugins(IRouteProtocol)."""

    name = "upper"
    options, dialectOption, keyHashing = (), None, False  # no keys, dialects or hashing

    def validate(self, route: Any) -> list[tuple[str, str]]:
        return []

    def buildFactory(self, route: Any, core: Any, reactor: Any) -> Factory:
        return Factory.forProtocol(lambda: _AppSide(core, reactor))


upper = UpperProtocol()
