"""The ``memcached`` dialect: the text protocol.

Requests: ``get``/``gets``/``gat``/``gats`` with one or many keys; the storage
commands ``set add replace append prepend cas`` with their data block; ``delete``,
``incr``, ``decr``, ``touch``, ``version``, ``stats``, ``verbosity``, ``flush_all``,
``mn`` and ``quit``.  ``noreply`` requests get no answer.  The meta commands and
anything else are answered ``unsupported`` (a data block of ``ms`` is skipped, so the
connection stays in step); the binary protocol is a protocol error.

Replies are framed by what was asked: a retrieval ends with ``END`` (its data blocks
are counted, so a value containing ``END\\r\\n`` is no end), ``stats`` with ``END``,
everything else is one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import ILineDialect
from ambassador.protocols.line import MAX_LINE, LineRequest, ProtocolError, Stream

UNSUPPORTED = "unsupported"
PROTOCOL_ERROR = "protocol-error"

#: Reply kinds, for the response parser.
LINE = "line"
VALUES = "values"
STATS = "stats"

STORAGE = frozenset([b"set", b"add", b"replace", b"append", b"prepend"])
RETRIEVAL = frozenset([b"get", b"gets"])
TOUCH_RETRIEVAL = frozenset([b"gat", b"gats"])
_ERRORS = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
_END = b"END\r\n"
MAX_DATA = 1024 * 1024 * 1024
#: memcached's KEY_MAX_LENGTH.
MAX_KEY = 250
#: Bytes on which memcached and ``bytes.split`` tokenize a line differently: memcached
#: splits on spaces only and reads the line as a C string (cut at NUL).  A storage
#: command the two read differently would leave its data block to be run as commands,
#: and the pooled member connection's replies out of step for every app on it (other
#: commands are one line and get one reply line either way).
_TOKENIZED_APART = re.compile(rb"[\x00\t\n\x0b\x0c\r]")


def _number(text: bytes) -> int:
    if not text.isdigit() or len(text) > 20:  # int() refuses 4300+ digits with a ValueError
        raise ProtocolError(f"not a number: {text[:20]!r}")
    return int(text)


def _signed(text: bytes) -> bytes:
    if len(text) > 21 or not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
        raise ProtocolError(f"not a number: {text[:20]!r}")
    return text


class MemcachedRequestParser:
    """Frames one app connection's text-protocol stream into requests."""

    def __init__(self, hashing: bool) -> None:
        self.hashing = hashing
        self.stream = Stream()
        self.failed = False

    def feed(self, data: bytes) -> list[LineRequest]:
        if self.failed:
            return []
        stream = self.stream
        stream.feed(data)
        if not stream.ready:
            return []
        buf = stream.join()
        pos = stream.pos
        size = len(buf)
        out: list[LineRequest] = []
        try:
            while pos < size:
                if buf[pos] == 0x80:
                    raise ProtocolError("the binary protocol is not supported")
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if size - pos > MAX_LINE:
                        raise ProtocolError("request line too long")
                    stream.wait(size + 1)
                    break
                line = buf[pos:eol]
                if line.endswith(b"\r"):
                    line = line[:-1]
                tokens = line.split()
                end = eol + 1
                if not tokens:
                    request = LineRequest.failing(UNSUPPORTED)
                else:
                    command = tokens[0]
                    if command in STORAGE or command == b"cas":
                        stored, end = self._storage(buf, tokens, line, end)
                        if stored is None:
                            stream.wait(end)
                            break
                        request = stored
                    elif command == b"ms" and len(tokens) >= 3:
                        # meta set: unsupported, but skip its data block to stay in step
                        length = _number(tokens[2])
                        if length > MAX_DATA:  # (else a made-up length buffers without bound)
                            raise ProtocolError("data block too large")
                        dataEnd = end + length + 2
                        if dataEnd > size:
                            stream.wait(dataEnd)
                            break
                        request, end = LineRequest.failing(UNSUPPORTED), dataEnd
                    else:
                        request = self._simple(command, tokens, line)
                out.append(request)
                pos = end
                stream.consume(pos)
                if request.close:
                    self.failed = True
                    break
        except ProtocolError:
            self.failed = True
            out.append(LineRequest.failing(PROTOCOL_ERROR, close=True))
        return out

    def _storage(
        self, buf: bytes, tokens: list[bytes], line: bytes, dataStart: int
    ) -> tuple[LineRequest | None, int]:
        """A storage command and its data block, or (None, bytes needed)."""
        fields = 6 if tokens[0] == b"cas" else 5
        if len(tokens) not in (fields, fields + 1):
            raise ProtocolError("wrong number of fields")
        noreply = len(tokens) == fields + 1
        if noreply and tokens[-1] != b"noreply":
            raise ProtocolError("bad noreply")
        # Fields memcached refuses without reading the data block are refused here
        # too (it would run the block as commands: see _TOKENIZED_APART).
        if _TOKENIZED_APART.search(line) is not None:
            raise ProtocolError("NUL or whitespace other than spaces in a storage command")
        if len(tokens[1]) > MAX_KEY:
            raise ProtocolError("key longer than 250 bytes")
        if _number(tokens[2]) > 0xFFFFFFFF:
            raise ProtocolError("flags over 32 bits")
        if not -(2**63) <= int(_signed(tokens[3])) < 2**63:
            raise ProtocolError("exptime out of range")
        length = _number(tokens[4])
        if length > MAX_DATA:
            raise ProtocolError("data block too large")
        if fields == 6 and _number(tokens[5]) >= 2**64:
            raise ProtocolError("cas unique over 64 bits")
        end = dataStart + length
        if end + 2 > len(buf):
            return None, end + 2
        if buf[end:end + 2] != b"\r\n":
            raise ProtocolError("data block not ended by CRLF")
        raw = b"%s\r\n%s" % (line, buf[dataStart:end + 2])
        return LineRequest(raw, tokens[1], False, LINE, not noreply), end + 2

    def _simple(self, command: bytes, tokens: list[bytes], line: bytes) -> LineRequest:
        raw = line + b"\r\n"
        n = len(tokens)
        if command in RETRIEVAL or command in TOUCH_RETRIEVAL:
            first = 2 if command in TOUCH_RETRIEVAL else 1
            if n <= first:
                raise ProtocolError("no key")
            keys = tokens[first:]
            return LineRequest(
                raw, keys[0], command in RETRIEVAL, VALUES,
                keys=keys if self.hashing and len(keys) > 1 else None, info=tokens,
            )
        noreply = tokens[-1] == b"noreply"
        if command == b"delete" and n in (2, 3):
            return LineRequest(raw, tokens[1], False, LINE, not noreply)
        if command in (b"incr", b"decr") and n in (3, 4):
            return LineRequest(raw, tokens[1], False, LINE, not noreply)
        if command == b"touch" and n in (3, 4):
            return LineRequest(raw, tokens[1], False, LINE, not noreply)
        if command == b"version" or command == b"mn":
            return LineRequest(raw, None, True, LINE)
        if command == b"stats":
            return LineRequest(raw, None, True, STATS)
        if command == b"verbosity" and n in (2, 3):
            return LineRequest(raw, None, False, LINE, not noreply)
        if command == b"flush_all" and n <= 3 and not self.hashing:
            return LineRequest(raw, None, False, LINE, not noreply)
        if command == b"quit":
            return LineRequest(raw, localReply=b"", close=True)
        return LineRequest.failing(UNSUPPORTED)


class MemcachedResponseParser:
    """Frames one member connection's stream into replies, by request kind."""

    def __init__(self) -> None:
        self.stream = Stream()

    def feed(self, data: bytes) -> None:
        self.stream.feed(data)

    def next(self, kind: Any) -> bytes | None:
        stream = self.stream
        if not stream.ready:
            return None
        buf = stream.join()
        pos = p = stream.pos
        size = len(buf)
        while True:
            eol = buf.find(b"\n", p)
            if eol < 0:
                if size - p > MAX_LINE:
                    raise ProtocolError("reply line too long")
                stream.wait(size + 1)
                return None
            if kind == LINE:
                p = eol + 1
                break
            if buf.startswith(b"VALUE ", p) and kind == VALUES:
                tokens = buf[p:eol].split()
                if len(tokens) < 4:
                    raise ProtocolError("bad VALUE line")
                end = eol + 1 + _number(tokens[3]) + 2
                if end > size:
                    stream.wait(end)
                    return None
                if buf[end - 2:end] != b"\r\n":
                    raise ProtocolError("data block not ended by CRLF")
                p = end
                continue
            if buf.startswith(b"STAT ", p) and kind == STATS:
                p = eol + 1
                continue
            if buf.startswith(_END, p) or buf.startswith(_ERRORS, p):
                p = eol + 1
                break
            raise ProtocolError(f"unexpected reply line {buf[p:p + 30]!r}")
        stream.consume(p)
        return buf[pos:p]


def valueBlocks(reply: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (key, VALUE block) pairs of a retrieval reply; None for an error reply."""
    if not reply.endswith(_END):
        return None
    blocks = []
    p = 0
    while reply.startswith(b"VALUE ", p):
        eol = reply.find(b"\n", p)
        tokens = reply[p:eol].split()
        end = eol + 1 + int(tokens[3]) + 2
        blocks.append((tokens[1], reply[p:end]))
        p = end
    return blocks


@implementer(IPlugin, ILineDialect)
class MemcachedDialect:
    """The ``memcached`` dialect plugin."""

    name = "memcached"
    healthCheck = b"version\r\n"

    def requestParser(self, route: Any) -> MemcachedRequestParser:
        return MemcachedRequestParser(route.balance == "hash")

    def responseParser(self) -> MemcachedResponseParser:
        return MemcachedResponseParser()

    def errorReply(self, reason: str) -> bytes:
        return b"SERVER_ERROR ambassador %s\r\n" % reason.encode()

    def split(
        self, request: LineRequest, ownerOf: Callable[[bytes], Any]
    ) -> tuple[list[LineRequest], Callable[[list[bytes]], bytes]] | None:
        tokens: list[bytes] = request.info
        first = 2 if tokens[0] in TOUCH_RETRIEVAL else 1
        keys = tokens[first:]
        groups: dict[Any, list[bytes]] = {}
        for key in keys:
            groups.setdefault(ownerOf(key), []).append(key)
        if len(groups) == 1:
            return None
        parts = [
            LineRequest(b" ".join([*tokens[:first], *group]) + b"\r\n", group[0], request.safe,
                        VALUES)
            for group in groups.values()
        ]

        def merge(replies: list[bytes]) -> bytes:
            found: dict[bytes, bytes] = {}
            for reply in replies:
                blocks = valueBlocks(reply)
                if blocks is None:
                    return reply
                found.update(blocks)
            return b"".join([found[key] for key in keys if key in found] + [_END])

        return parts, merge


memcachedDialect = MemcachedDialect()
