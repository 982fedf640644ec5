"""Member endpoints: endpoint strings to client endpoints, with the route's TLS.

Two ways to reach a member over TLS (SPEC §5): a ``tls:`` endpoint string (Twisted's
own parser: chain and host name verified, ``trustRoots``, ``certificate``/
``privateKey``), or a route's ``[route.tls]`` table, which wraps whatever the member
string connects (``tcp:``, ``unix:``, ...) with ``wrapClientTLS`` and
``optionsForClientTLS``.  Either way the endpoint is put behind
:class:`ambassador.tls.VerifiedTLSEndpoint`, so that an attempt succeeds only after a
verified handshake and a bad certificate is a ``tls-error``, whatever the protocol.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import clientFromString, wrapClientTLS

from ambassador.endpoints import memberHost
from ambassador.tls import VerifiedTLSEndpoint, clientOptions

#: Member endpoint-string prefixes that speak TLS through Twisted's TLS wrapper.
TLS_PREFIXES = ("tls",)


def isTLSMember(upstream: str) -> bool:
    """Does this member endpoint string already speak TLS by itself?"""
    return upstream.split(":", 1)[0] in TLS_PREFIXES


def tlsServerName(upstream: str, tls: Any, hostName: str | None = None) -> str | None:
    """The name a ``[route.tls]`` member's certificate must carry (also sent as SNI):
    ``server_name``, else the member's host name (``hostName`` for a member found by
    ``dns:``/``srv:``, whose endpoint string holds only an address); None when there
    is none (``unix:``)."""
    if tls.serverName:
        return str(tls.serverName)
    if hostName:
        return hostName
    if upstream.startswith("dns:"):
        return upstream.split(":")[1] or None
    return memberHost(upstream)


def memberEndpoint(
    reactor: Any, upstream: str, tls: Any = None, route: str | None = None,
    hostName: str | None = None,
) -> Any:
    """The client endpoint (an ``IStreamClientEndpoint``) for a member, wrapped in TLS
    when the route has ``[route.tls]``.

    Verification is always on.  Certificate files are read here, once per endpoint
    built (a reload builds new endpoints, so rotated files are picked up then).

    @param tls: the route's ``TLSPolicy`` or None.
    @param route: the route's name, for the log line of a failed handshake.
    @param hostName: the DNS name behind a discovered member (``tcp:ADDRESS:PORT``
        found by ``dns:HOST:PORT`` or ``srv:``): the name to verify, not the address.
    @raise ambassador.tls.TLSFileError: a certificate file became unusable after the
        config was checked.
    """
    endpoint = clientFromString(reactor, upstream)
    if tls is None:
        if isTLSMember(upstream):
            return VerifiedTLSEndpoint(endpoint, route=route, upstream=upstream)
        return endpoint
    serverName = tlsServerName(upstream, tls, hostName) or "localhost"
    options = clientOptions(serverName, tls.trustRoots, tls.certificate, tls.privateKey)
    return VerifiedTLSEndpoint(wrapClientTLS(options, endpoint), route=route, upstream=upstream)
