"""The seams where other code plugs into the ambassador.

A route protocol (SPEC §9) is a Twisted plugin: an object providing both
``twisted.plugin.IPlugin`` and :class:`IRouteProtocol`, instantiated in a module
under some package's ``twisted/plugins/`` directory.  The ambassador finds it with
``twisted.plugin.getPlugins(IRouteProtocol)`` and never imports it by name.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class RouteOption:
    """A route-level config key that only one protocol understands.

    ``parse`` turns the TOML value into the value the protocol wants and raises
    ``ValueError`` with a message for ops when it is wrong; the config loader adds
    the file, route and key to that message.  ``default`` is used as it is (it is not
    passed through ``parse``).
    """

    name: str
    parse: Callable[[Any], Any]
    default: Any = None


class IRouteProtocol(Interface):
    """A kind of route: how app connections are served and upstream attempts made."""

    name = Attribute("The protocol name used in config, e.g. 'tcp'.")
    options = Attribute(
        "A sequence of RouteOption: the route keys this protocol adds to the common ones."
    )
    dialectOption = Attribute(
        "The name of the option that --route's PROTOCOL:DIALECT sets, or None when the "
        "protocol has no dialects."
    )
    keyHashing = Attribute("True if requests carry a key, so that balance = 'hash' is allowed.")

    def validate(route: Any) -> list[tuple[str, str]]:
        """
        Cross-key checks on a parsed route (an ``ambassador.config.Route``).

        @return: (key, message) pairs, empty when the route is fine.
        """

    def buildFactory(route: Any, core: Any, reactor: Any) -> Any:
        """
        Build the server protocol factory that serves the route's listen endpoint.

        @param route: the route's ``ambassador.config.Route``.
        @param core: the route's ``ambassador.resilience.RouteCore``; every upstream
            attempt goes through it (retry, timeouts, breakers, balancing).
        @param reactor: the reactor (time, TCP) to use; never import the global one.
        @return: an ``IProtocolFactory``.
        """


class IBalancer(Interface):
    """Chooses the member for an attempt among the members that are usable now."""

    def pick(members: Any, exclude: Any, key: Any) -> Any:
        """
        @param members: the route's members, in configured order.
        @param exclude: members already tried for this request (prefer others).
        @param key: the request's key (bytes) or None.
        @return: a usable ``Member``, or None when no member is usable.
        """


class IRouteObserver(Interface):
    """Sees what a route's resilience core does; metrics and access logs plug in here.

    Every call is made on the hot path: implementations must be cheap.
    """

    def attemptFinished(route: str, member: Any, result: str, duration: float, count: int = 1) -> None:
        """One attempt ended; ``result`` is 'ok' or a failure reason / status.
        ``count``: the attempt carried that many requests (a line route's pipelined
        burst), to be counted as that many attempts; passed only by calls that carry
        several (a burst cut short passes its answered and failed shares separately,
        either of which may be 1)."""

    def retried(route: str) -> None:
        """A retry was decided (counted when decided, before its backoff)."""

    def breakerChanged(route: str, member: Any, state: str) -> None:
        """A member's breaker moved to 'closed', 'half-open' or 'open'."""

    def requestFinished(route: str, record: Any) -> None:
        """A request (tcp: a connection) ended; ``record`` is a ``RequestRecord``
        (``record.count`` requests: more than one for a line route's burst)."""

    def connectionsChanged(route: str, active: int) -> None:
        """The number of downstream connections of the route changed."""


class ILineDialect(Interface):
    """The framing of a ``line`` route (SPEC §4/line, §9): how the app's byte stream
    splits into requests and a member's into replies, which requests are safe to
    repeat, their keys, and the ambassador's own error reply.

    A dialect is a Twisted plugin (``IPlugin`` and this), found with
    ``twisted.plugin.getPlugins(ILineDialect)``; ``ambassador.protocols.line`` has
    the base classes (``LineRequest``, ``ProtocolError``) a dialect builds on.
    """

    name = Attribute("The dialect name: the value of a line route's 'dialect' option.")

    def requestParser(route: Any) -> Any:
        """
        A new incremental parser of one app connection's bytes.

        @param route: the ``ambassador.config.Route`` (options, ``balance``).
        @return: an object with ``feed(data: bytes) -> list[LineRequest]``, raising
            ``ProtocolError`` on a malformed request (after which it is not used again).
            Optional, for speed: a ``runs`` attribute (False at first) which the route
            sets to True when it may get several pipelined requests as one
            ``ambassador.protocols.line.LineRun`` (see there).
        """

    def responseParser() -> Any:
        """
        A new incremental parser of one member connection's bytes.

        @return: an object with ``feed(data: bytes) -> None`` and
            ``next(kind) -> bytes | None``: the raw bytes of the next complete reply to
            a request whose ``LineRequest.kind`` is ``kind``, or None until it is all
            there; raises ``ProtocolError`` when the member speaks garbage.
            Optional, for speed: ``many(n) -> (count, bytes)``, up to ``n`` replies at
            once, how many and their bytes; only for a dialect whose replies frame
            alike whatever their request's ``kind`` (redis). Without it the route
            frames a burst's replies with ``next``, request by request.
        """

    def errorReply(reason: str) -> bytes:
        """The ambassador's own error reply for ``reason`` (e.g. b"-ERR ambassador reset\\r\\n")."""

    def split(request: Any, ownerOf: Callable[[bytes], Any]) -> Any:
        """
        Split a multi-key request (``LineRequest.keys`` set) per owner under
        ``balance = "hash"``.

        @param ownerOf: maps a key to a hashable token naming its member.
        @return: None when every key has the same owner (send the request whole), else
            ``(parts, merge)``: requests (each with the key of its owner) and a function
            from their replies, in order, to the reply for the app.
        """
