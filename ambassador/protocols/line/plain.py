"""The generic ``line`` dialect: one line (``\\n`` or ``\\r\\n``) a request, one line a
reply.

Nothing is known of the requests' meaning: they are safe to repeat only when the
route says ``idempotent = true``, and under ``balance = "hash"`` the whole line
(without its line ending) is the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import ILineDialect
from ambassador.protocols.line import MAX_LINE, LineRequest, ProtocolError, Stream


def _nextLine(stream: Stream) -> bytes | None:
    buf = stream.join()
    pos = stream.pos
    eol = buf.find(b"\n", pos)
    if eol < 0:
        if len(buf) - pos > MAX_LINE:
            raise ProtocolError("line too long")
        stream.wait(len(buf) + 1)
        return None
    stream.consume(eol + 1)
    return buf[pos:eol + 1]


class PlainRequestParser:
    def __init__(self, idempotent: bool) -> None:
        self.idempotent = idempotent
        self.stream = Stream()
        self.failed = False

    def feed(self, data: bytes) -> list[LineRequest]:
        if self.failed:
            return []
        stream = self.stream
        stream.feed(data)
        out = []
        try:
            while stream.ready:
                line = _nextLine(stream)
                if line is None:
                    break
                out.append(LineRequest(line, line.rstrip(b"\r\n"), self.idempotent))
        except ProtocolError:
            self.failed = True
            out.append(LineRequest.failing("protocol-error", close=True))
        return out


class PlainResponseParser:
    def __init__(self) -> None:
        self.stream = Stream()

    def feed(self, data: bytes) -> None:
        self.stream.feed(data)

    def next(self, kind: Any) -> bytes | None:
        if not self.stream.ready:
            return None
        return _nextLine(self.stream)


@implementer(IPlugin, ILineDialect)
class PlainDialect:
    """The generic ``line`` dialect plugin."""

    name = "line"
    healthCheck = None

    def requestParser(self, route: Any) -> PlainRequestParser:
        return PlainRequestParser(bool(route.options.get("idempotent")))

    def responseParser(self) -> PlainResponseParser:
        return PlainResponseParser()

    def errorReply(self, reason: str) -> bytes:
        return b"ERROR ambassador %s\r\n" % reason.encode()

    def split(self, request: LineRequest, ownerOf: Callable[[bytes], Any]) -> None:
        return None


plainDialect = PlainDialect()
