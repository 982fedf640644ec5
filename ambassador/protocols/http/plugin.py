"""The ``http`` protocol plugin: its route options and its factory."""

from __future__ import annotations

import re
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import IRouteProtocol, RouteOption
from ambassador.resilience import reasons
from ambassador.units import parseSize

#: SPEC §2 defaults.
DEFAULT_RETRY_ON = ("connect-failure", "tls-error", "reset", "timeout", "502", "503", "504")
DEFAULT_RETRY_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
_REASONS = (reasons.CONNECT_FAILURE, reasons.TLS_ERROR, reasons.RESET, reasons.TIMEOUT)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOST = re.compile(r"^[A-Za-z0-9.\-_\[\]:]+$")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list, not {value!r}")
    return value


def parseRetryOn(value: Any) -> tuple[str, ...]:
    """Failure reasons and status codes (strings or integers) that may be retried."""
    out = []
    for item in _list(value):
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise ValueError(f"entries must be reasons or status codes, not {item!r}")
        if (item.isdigit() and len(item) == 3 and 100 <= int(item) <= 599) or item in _REASONS:
            out.append(item)
        else:
            raise ValueError(
                f"{item!r} is neither a status code (e.g. \"503\") nor one of {', '.join(_REASONS)}"
            )
    return tuple(out)


def parseRetryMethods(value: Any) -> tuple[str, ...]:
    out = []
    for item in _list(value):
        if not isinstance(item, str) or not _TOKEN.match(item):
            raise ValueError(f"{item!r} is not an HTTP method")
        out.append(item.upper())
    return tuple(out)


def parseHostHeader(value: Any) -> str:
    if not isinstance(value, str) or not value or not _HOST.match(value):
        raise ValueError(f"must be a host name, optionally with :port, not {value!r}")
    return value


def parseTrace(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


@implementer(IPlugin, IRouteProtocol)
class HTTPRouteProtocol:
    """The ``http`` protocol plugin (SPEC §4/http)."""

    name = "http"
    options = (
        RouteOption("retry_on", parseRetryOn, DEFAULT_RETRY_ON),
        RouteOption("retry_methods", parseRetryMethods, DEFAULT_RETRY_METHODS),
        RouteOption("host_header", parseHostHeader, None),
        RouteOption("max_retry_body", parseSize, 1024 * 1024),
        RouteOption("trace", parseTrace, False),
    )
    dialectOption = None
    keyHashing = False

    def validate(self, route: Any) -> list[tuple[str, str]]:
        return []

    def buildFactory(self, route: Any, core: Any, reactor: Any) -> Any:
        from ambassador.protocols.http.server import HTTPFactory

        return HTTPFactory(route, core, reactor)


httpProtocol = HTTPRouteProtocol()
