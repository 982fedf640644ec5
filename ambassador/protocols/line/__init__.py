"""The ``line`` route: request/response protocols framed in lines (SPEC §4/line).

The route (``protocol.py``) knows nothing of any one protocol: a *dialect*
(``ambassador.interfaces.ILineDialect``: ``plain.py``, ``redis.py``,
``memcached.py``, or a third party's plugin) splits the app's stream into
:class:`LineRequest` objects and a member's stream into replies.  This module holds
what a dialect builds on.
"""

from __future__ import annotations

from typing import Any

#: The longest line (a request line, a header line) accepted before a CRLF; longer is
#: a protocol error rather than a buffer that grows without bound (redis uses 64 KiB).
MAX_LINE = 64 * 1024


class ProtocolError(Exception):
    """A peer sent bytes the dialect cannot frame."""


class LineRequest:
    """One request of an app connection, as the dialect framed it.

    @ivar raw: the bytes to write to a member.
    @ivar key: the key that picks the member under ``balance = "hash"``, or None.
    @ivar safe: may it be repeated once it may have reached a member (read-only)?
    @ivar kind: what the dialect's response parser needs to know to frame the reply
        (e.g. memcached: a ``get`` ends with ``END``); opaque to the route.
    @ivar expectsReply: False for requests the member never answers (memcached
        ``noreply``): they are done once written, and the app gets nothing.
    @ivar keys: for multi-key commands that may be split under ``hash``, their keys
        (then the dialect's ``split`` is asked); else None.
    @ivar error: answer at once with the dialect's error reply for this reason
        (``unsupported``, ``protocol-error``), without reaching any member.
    @ivar localReply: answer at once with these bytes, without reaching any member.
    @ivar close: close the app connection once this request is answered.
    @ivar info: the dialect's own parse of the request (e.g. redis arguments).
    """

    __slots__ = (
        "close",
        "error",
        "expectsReply",
        "info",
        "key",
        "keys",
        "kind",
        "localReply",
        "raw",
        "safe",
    )

    #: How many requests this stands for (a :class:`LineRun`: several).
    count = 1

    def __init__(
        self, raw: bytes, key: bytes | None = None, safe: bool = False, kind: Any = None,
        expectsReply: bool = True, keys: Any = None, error: str | None = None,
        localReply: bytes | None = None, close: bool = False, info: Any = None,
    ) -> None:
        self.raw = raw
        self.key = key
        self.safe = safe
        self.kind = kind
        self.expectsReply = expectsReply
        self.keys = keys
        self.error = error
        self.localReply = localReply
        self.close = close
        self.info = info

    @classmethod
    def failing(cls, reason: str, raw: bytes = b"", close: bool = False) -> LineRequest:
        """A request the ambassador answers itself with the error reply for ``reason``."""
        return cls(raw, error=reason, close=close)

    def __repr__(self) -> str:
        return f"<LineRequest {self.raw[:40]!r} key={self.key!r} safe={self.safe}>"


#: ``LineRequest.kind`` of a :class:`LineRun`.
MANY = object()


class LineRun(LineRequest):
    """Several requests in a row of one app connection, handled as one (a burst):
    ``count`` requests whose bytes, in order, are ``raw``; each is sent as it is,
    expects one reply and is answered by no one but a member.

    The line route makes runs of the requests a dialect's parser hands it.  A
    parser may also hand out runs itself, which spares it an object per request:
    it may when the route sets its ``runs`` attribute to True (never under hash
    routing, nor with the access log on), and then ``split`` must give the single
    requests, used only when one of them must go on alone (a retry).
    """

    __slots__ = ("count", "split")

    def __init__(self, raw: bytes, count: int, split: Any) -> None:
        LineRequest.__init__(self, raw, kind=MANY)
        self.count = count
        #: () -> the ``count`` single ``LineRequest`` objects.
        self.split = split

    @classmethod
    def of(cls, requests: list[LineRequest]) -> LineRun:
        """The run of ``requests`` (single requests, already framed)."""
        return cls(b"".join([r.raw for r in requests]), len(requests), requests.copy)

    def __repr__(self) -> str:
        return f"<LineRun of {self.count} {self.raw[:40]!r}>"


class Stream:
    """Bytes received and not yet framed.

    Chunks are joined only once enough bytes are there for the parser to progress
    (``need``), so a 5 MB value arriving in 64 KiB reads is copied once, not eighty
    times.  ``buf[pos:]`` plus ``chunks`` is what is left to parse.
    """

    __slots__ = ("buf", "chunks", "need", "pos", "size")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.need = 1

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    @property
    def ready(self) -> bool:
        """Are there enough bytes to try parsing again?"""
        return self.size >= self.need

    def join(self) -> bytes:
        """Everything unparsed, from ``self.pos`` on, as one bytes object."""
        if self.chunks:
            if self.pos < len(self.buf):
                self.buf = b"".join([self.buf[self.pos:], *self.chunks])
            elif len(self.chunks) == 1:
                self.buf = self.chunks[0]
            else:
                self.buf = b"".join(self.chunks)
            self.pos = 0
            self.chunks = []
        return self.buf

    def consume(self, end: int) -> None:
        """Bytes up to ``end`` (an index in ``buf``) are framed."""
        self.size -= end - self.pos
        self.pos = end
        self.need = 1

    def wait(self, end: int) -> None:
        """Nothing can be framed until ``buf`` holds ``end`` bytes."""
        self.need = max(end - self.pos, self.size + 1)
