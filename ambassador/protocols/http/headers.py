"""Header rules of the http route: hop-by-hop filtering, Host, Retry-After, own answers.

Everything here works on the raw ``bytes`` the parser hands over, so the hot path
never decodes a header it only passes on.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable
from http import HTTPStatus

from twisted.internet.endpoints import _parse

#: RFC 9110 §7.6.1 plus the de-facto ones (SPEC §4/http): never forwarded either way.
#: ``Proxy-*`` is matched by prefix in :func:`isHopByHop`.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding",
    b"upgrade", b"proxy-connection",
})

#: Largest request head (request line + headers) accepted from an app (SPEC: 64 KiB).
MAX_HEAD = 64 * 1024

#: The ambassador's own answers: status per failure reason (SPEC §4/http table).
ERROR_STATUS = {
    "connect-failure": 502, "tls-error": 502, "reset": 502, "protocol-error": 502,
    "breaker-open": 503, "budget-exhausted": 503, "overloaded": 503, "no-upstream": 503,
    "timeout": 504, "deadline": 504, "unsupported": 501,
}

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def reasonPhrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def isHopByHop(name: bytes) -> bool:
    """``name`` is lower-case."""
    return name in HOP_BY_HOP or name.startswith(b"proxy-")


def connectionTokens(values: Iterable[bytes]) -> set[bytes]:
    """The header names listed by ``Connection`` headers (lower-case), minus the
    ``close``/``keep-alive`` options that are not header names we would see anyway."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def memberHostHeader(upstream: str, tls: bool) -> bytes | None:
    """The Host header a member gets when the route sets no ``host_header`` (SPEC §2).

    ``tcp:HOST:PORT`` -> ``HOST:PORT`` (``HOST`` alone for port 80); ``tls:`` or a route
    with ``[route.tls]``: ``HOST`` alone for port 443; ``unix:`` -> ``localhost``.
    Other (third-party) endpoint types: None, and the app's own Host is kept.
    """
    try:
        args, kwargs = _parse(upstream)
    except Exception:
        return None
    prefix = args[0] if args else ""
    if prefix == "unix":
        return b"localhost"
    if prefix not in ("tcp", "tls", "ssl"):
        return None
    host = kwargs.get("host", args[1] if len(args) > 1 else None)
    port = kwargs.get("port", args[2] if len(args) > 2 else None)
    if not host:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    secure = tls or prefix in ("tls", "ssl")
    if port is None or str(port) == ("443" if secure else "80"):
        return host.encode("idna") if host.isascii() is False else host.encode("ascii")
    return f"{host}:{port}".encode("ascii")


def parseRetryAfter(value: bytes, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date."""
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def errorResponse(
    reason: str, attempts: int, close: bool, head: bool = False, status: int | None = None,
    extra: bytes = b"",
) -> bytes:
    """The ambassador's own answer: status from the SPEC table, ``x-ambassador-error``,
    ``x-ambassador-attempts`` and a short text body."""
    if status is None:
        status = ERROR_STATUS.get(reason, 502)
    body = b"ambassador: %s\n" % reason.encode("ascii")
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, reasonPhrase(status)),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-ambassador-error: %s\r\n" % reason.encode("ascii"),
        b"x-ambassador-attempts: %d\r\n" % attempts,
        extra,
        b"connection: close\r\n\r\n" if close else b"\r\n",
    ]
    if not head:
        parts.append(body)
    return b"".join(parts)
