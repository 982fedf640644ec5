"""Endpoint strings: loopback by default for listeners, checks for members.

An ambassador is never an open proxy by accident (SPEC §2): a ``tcp:``, ``ssl:`` or
``mtls:`` listen endpoint without ``interface=`` binds 127.0.0.1 (``tcp6:``: ::1).
Strings are checked by letting Twisted's own parsers build the endpoint against a
``MemoryReactor``, so whatever Twisted (or an installed endpoint plugin) accepts, we
accept, and nothing binds or connects while checking.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.endpoints import _parse, clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

_LOOPBACK = {"tcp": "127.0.0.1", "ssl": "127.0.0.1", "mtls": "127.0.0.1", "tcp6": "\\:\\:1"}


class EndpointError(ValueError):
    """An endpoint string that Twisted cannot use."""


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    try:
        args, kwargs = _parse(description)
    except Exception as e:  # _parse raises assorted errors on junk
        raise EndpointError(f"{description!r} is not an endpoint string: {e}") from None
    if not args or not args[0]:
        raise EndpointError(f"{description!r} is not an endpoint string")
    return args, kwargs


def normalizeListen(description: str) -> str:
    """The listen endpoint string with the loopback interface made explicit."""
    args, kwargs = _split(description)
    prefix = args[0]
    if prefix in _LOOPBACK and "interface" not in kwargs:
        description = f"{description}:interface={_LOOPBACK[prefix]}"
    if prefix == "systemd":
        # Twisted's parser looks the inherited socket up while parsing, which fails
        # outside systemd: check the syntax only, so `check` works anywhere.
        _checkSystemd(description, kwargs)
        return description
    try:
        _checkPort(serverFromString(MemoryReactor(), description), 0)
    except Exception as e:
        raise EndpointError(f"{description!r} is not a usable listen endpoint: {_reason(e)}") from None
    return description


#: Listen endpoints whose Twisted parsers take ``backlog=``.
_BACKLOG = ("tcp", "tcp6", "ssl", "mtls", "unix")


def _somaxconn() -> int:
    """The kernel's cap on a listener's accept queue (Linux; 4096 where unknown)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 4096


def withBacklog(description: str) -> str:
    """The listen endpoint string to bind: with the longest accept queue the kernel
    allows, unless it names its own ``backlog=``.

    Twisted's default backlog is 50.  A burst of app connections beyond it overflows
    the queue before the route can serve them or turn them away with ``overloaded``
    (SPEC §4): 5,000 connections at once against a backlog of 50 left 4,200 of them
    established on the app's side and dropped by the kernel (syncookies), neither
    served nor closed 25 s later (tests/chaos/test_overload.py).  Go listens with
    ``net.core.somaxconn`` for the same reason; HAProxy with at least its maxconn.
    """
    args, kwargs = _split(description)
    if args[0] not in _BACKLOG or "backlog" in kwargs:
        return description
    return f"{description}:backlog={_somaxconn()}"


def _checkSystemd(description: str, kwargs: dict[str, str]) -> None:
    if kwargs.get("domain") not in ("INET", "INET6", "UNIX"):
        raise EndpointError(f"{description!r}: systemd: needs domain=INET, INET6 or UNIX")
    if ("index" in kwargs) == ("name" in kwargs):
        raise EndpointError(f"{description!r}: systemd: needs exactly one of index=N or name=NAME")
    if "index" in kwargs and not kwargs["index"].isdigit():
        raise EndpointError(f"{description!r}: systemd: index must be a number >= 0")


def listenKey(description: str) -> Any:
    """What two listeners must not share: (family, port, interface) or the path."""
    args, kwargs = _split(description)
    prefix = args[0]
    if prefix in _LOOPBACK:
        port = kwargs.get("port", args[1] if len(args) > 1 else "")
        family = "tcp6" if prefix == "tcp6" else "tcp"
        return (family, str(port), kwargs.get("interface", ""))
    if prefix == "unix":
        return ("unix", kwargs.get("address", args[1] if len(args) > 1 else ""))
    return description


def checkClientEndpoint(description: str) -> None:
    """Raise EndpointError unless the member endpoint string is usable."""
    args, kwargs = _split(description)
    if args[0] in ("dns", "srv"):
        checkDiscoveredMember(description)
        return
    if args[0] == "tls":
        from ambassador.tls import TLSFileError, checkTLSMemberString

        try:
            checkTLSMemberString(description, args, kwargs)
        except TLSFileError as e:
            raise EndpointError(f"{description!r} is not a usable member endpoint: {e}") from None
    try:
        _checkPort(clientFromString(MemoryReactor(), description), 1)
    except Exception as e:
        raise EndpointError(f"{description!r} is not a usable member endpoint: {_reason(e)}") from None


_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


def checkDiscoveredMember(description: str) -> tuple[str, str, int | None]:
    """Parse a ``dns:HOST:PORT`` or ``srv:NAME`` member (SPEC §2).

    @return: ``(kind, name, port)``; port is None for ``srv:`` (each SRV record has one).
    @raise EndpointError: not that syntax, not a DNS name, or a bad port.
    """
    kind, _, rest = description.partition(":")
    if kind == "dns":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise EndpointError(f"{description!r} is not dns:HOST:PORT")
        if not _DNS_NAME.match(host):
            raise EndpointError(f"{description!r}: {host!r} is not a DNS name")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EndpointError(f"{description!r}: port {port!r} is not between 1 and 65535")
        return kind, host, int(port)
    if kind == "srv":
        if not rest or not _DNS_NAME.match(rest):
            raise EndpointError(f"{description!r} is not srv:NAME (e.g. srv:_redis._tcp.cache.internal)")
        return kind, rest, None
    raise EndpointError(f"{description!r} is not a dns: or srv: member")


def memberHost(description: str) -> str | None:
    """The host name a member endpoint connects to (for Host headers and SNI), if any."""
    args, kwargs = _split(description)
    if args[0] in ("tcp", "tls", "ssl") and (len(args) > 1 or "host" in kwargs):
        return kwargs.get("host", args[1] if len(args) > 1 else None)
    return None


def _checkPort(endpoint: Any, lowest: int) -> None:
    """Twisted's parsers take any integer as a port; the OS refuses it only at bind or
    connect time, which is too late for a config check."""
    endpoint = getattr(endpoint, "_wrappedEndpoint", endpoint)
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not lowest <= port <= 65535:
        raise ValueError(f"port {port} is not between {lowest} and 65535")


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
