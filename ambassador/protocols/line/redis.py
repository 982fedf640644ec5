"""The ``redis`` dialect: RESP2 requests (arrays of bulk strings, inline commands)
and every RESP2 reply (simple strings, errors, integers, bulk and null bulk strings,
arrays, nested and null).

Requests are forwarded byte for byte (inline commands are re-encoded as arrays);
replies are framed, not decoded, except where a split command's parts are merged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import ILineDialect

try:
    from hiredis import Reader as _Reader
except ImportError:  # pragma: no cover - hiredis is a dependency; the Python framing stays exact
    _Reader = None
from functools import partial

from ambassador.protocols.line import MAX_LINE, LineRequest, LineRun, ProtocolError, Stream

#: Redis's own limits (proto-max-bulk-len, and the multibulk length it accepts).
MAX_BULK = 512 * 1024 * 1024
MAX_ARGS = 1024 * 1024
#: Deepest reply nesting accepted from a member (redis never nests this deep).
MAX_DEPTH = 64

UNSUPPORTED = "unsupported"
PROTOCOL_ERROR = "protocol-error"

#: Commands that read only: repeated after a reset, they do no harm (SPEC §4/line).
READ_ONLY = frozenset(
    b"""GET MGET EXISTS TTL PTTL EXPIRETIME PEXPIRETIME TYPE STRLEN GETRANGE SUBSTR GETBIT
    BITCOUNT BITPOS HGET HGETALL HMGET HEXISTS HKEYS HVALS HLEN HSTRLEN HRANDFIELD HSCAN
    LRANGE LLEN LINDEX LPOS SMEMBERS SISMEMBER SMISMEMBER SCARD SRANDMEMBER SSCAN SUNION
    SINTER SDIFF SINTERCARD ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE ZRANGEBYLEX
    ZREVRANGEBYLEX ZSCORE ZMSCORE ZCARD ZCOUNT ZLEXCOUNT ZRANK ZREVRANK ZRANDMEMBER ZSCAN
    ZUNION ZINTER ZDIFF ZINTERCARD XRANGE XREVRANGE XLEN GEOPOS GEODIST GEOHASH GEOSEARCH
    GEORADIUS_RO GEORADIUSBYMEMBER_RO PFCOUNT DUMP OBJECT LCS SORT_RO KEYS SCAN DBSIZE
    RANDOMKEY PING ECHO TIME INFO LASTSAVE COMMAND HELLO""".split()
)

#: Commands that need a connection of their own, or change a pooled connection's
#: state for everyone on it: they cannot work through a pooled proxy.
ALWAYS_UNSUPPORTED = frozenset(
    b"""SUBSCRIBE PSUBSCRIBE SSUBSCRIBE UNSUBSCRIBE PUNSUBSCRIBE SUNSUBSCRIBE MONITOR MULTI
    EXEC DISCARD WATCH UNWATCH SELECT AUTH CLIENT RESET READONLY READWRITE ASKING
    SYNC PSYNC REPLCONF WAIT WAITAOF BLPOP BRPOP BRPOPLPUSH BLMOVE BLMPOP BZPOPMIN
    BZPOPMAX BZMPOP""".split()
)

#: Under ``balance = "hash"``: commands over several keys that cannot be split per
#: member, and commands over the whole keyspace (one member's answer would be a lie).
HASH_UNSUPPORTED = frozenset(
    b"""MSETNX RENAME RENAMENX SMOVE SUNION SINTER SDIFF SUNIONSTORE SINTERSTORE SDIFFSTORE
    SINTERCARD ZUNION ZINTER ZDIFF ZUNIONSTORE ZINTERSTORE ZDIFFSTORE ZINTERCARD ZRANGESTORE
    LMOVE RPOPLPUSH LMPOP ZMPOP PFMERGE BITOP COPY LCS GEOSEARCHSTORE XREAD XREADGROUP
    MIGRATE SWAPDB KEYS SCAN DBSIZE RANDOMKEY FLUSHALL FLUSHDB""".split()
)

#: Scripts and functions: unsupported under hash when they name keys.
SCRIPTS = frozenset(b"EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO".split())

#: Multi-key commands split per member under hash, and how their replies merge.
SPLIT = {b"MGET": "array", b"DEL": "sum", b"UNLINK": "sum", b"EXISTS": "sum",
         b"TOUCH": "sum", b"MSET": "ok"}

_OK = b"+OK\r\n"


def _number(text: bytes) -> int:
    """A strict decimal integer (``int()`` would take spaces, ``+`` and ``_``)."""
    if len(text) <= 20 and (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
        return int(text)  # (int() refuses over 4300 digits with a ValueError)
    raise ProtocolError(f"not a number: {text[:20]!r}")


def encode(args: list[bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def replyEnd(buf: bytes, pos: int, depth: int = 0) -> int:
    """The end of the RESP2 reply that starts at ``pos``.

    @raise _Incomplete: with the buffer length needed to get further.
    @raise ProtocolError: the bytes are not RESP2.
    """
    if pos >= len(buf):
        raise _Incomplete(pos + 1)
    kind = buf[pos]
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        if len(buf) - pos > MAX_LINE:
            raise ProtocolError("reply line too long")
        raise _Incomplete(len(buf) + 1)
    if kind == 43 or kind == 45:  # + -
        return eol + 2
    if kind == 58:  # :
        _number(buf[pos + 1:eol])
        return eol + 2
    if kind == 36:  # $
        n = _number(buf[pos + 1:eol])
        if n < 0:
            if n != -1:
                raise ProtocolError("bad bulk length")
            return eol + 2
        end = eol + 2 + n
        if end + 2 > len(buf):
            raise _Incomplete(end + 2)
        if buf[end:end + 2] != b"\r\n":
            raise ProtocolError("bulk string not ended by CRLF")
        return end + 2
    if kind == 42:  # *
        n = _number(buf[pos + 1:eol])
        if n < -1:
            raise ProtocolError("bad array length")
        if depth >= MAX_DEPTH:
            raise ProtocolError("reply nested too deep")
        p = eol + 2
        for _ in range(n):
            p = replyEnd(buf, p, depth + 1)
        return p
    raise ProtocolError(f"not a RESP2 reply: {buf[pos:pos + 20]!r}")


class _Incomplete(Exception):
    def __init__(self, need: int) -> None:
        self.need = need


def arrayItems(reply: bytes) -> list[bytes] | None:
    """The raw elements of an array reply, or None when it is not an array."""
    if not reply.startswith(b"*"):
        return None
    eol = reply.find(b"\r\n")
    n = _number(reply[1:eol])
    items = []
    p = eol + 2
    for _ in range(max(n, 0)):
        end = replyEnd(reply, p)
        items.append(reply[p:end])
        p = end
    return items


def _plainCommands(hashing: bool) -> dict[bytes, bool]:
    """A cache: command names, as apps spell them, that ``classify`` passes on as
    they are (no error, no split, no look at the other arguments), with whether each
    is read-only.  Filled as names are first seen, up to ``_PLAIN_MAX`` of them."""
    return _PLAIN_HASHED if hashing else _PLAIN


_PLAIN: dict[bytes, bool] = {}
_PLAIN_HASHED: dict[bytes, bool] = {}
#: Bounds the caches: an app sending made-up command names cannot grow them.
_PLAIN_MAX = 1024
#: Commands whose classification reads more than their name.
_LOOKS_AT_ARGS = frozenset([b"HELLO", b"QUIT", b"XREAD", b"XREADGROUP"])


def _isPlain(name: bytes, hashing: bool) -> bool:
    """Is every request named ``name`` (upper case) classified as plain?"""
    if name in ALWAYS_UNSUPPORTED or name in _LOOKS_AT_ARGS:
        return False
    return not (hashing and (name in HASH_UNSUPPORTED or name in SCRIPTS or name in SPLIT))


def _arguments(raw: bytes) -> list[bytes]:
    """The arguments of one complete, well-formed RESP array of bulk strings."""
    eol = raw.find(b"\r\n")
    p = eol + 2
    args = []
    for _ in range(int(raw[1:eol])):
        eol = raw.find(b"\r\n", p)
        start = eol + 2
        end = start + int(raw[p + 1:eol])
        args.append(raw[start:end])
        p = end + 2
    return args


#: Bursts up to this size are framed by hiredis first (see ``_frameBurst``); a larger
#: buffer (a big value arriving) is framed by the Python loop, which copies it once.
FAST_BURST = 64 * 1024


def _digits(n: int) -> int:
    return 1 if n < 10 else 2 if n < 100 else len(str(n))


def _frameBurst(
    buf: bytes, pos: int, plain: dict[bytes, bool], classify: Callable[..., LineRequest],
    out: list[LineRequest],
) -> int:
    """Frame the complete arrays of bulk strings at the start of ``buf[pos:]`` with
    hiredis's C reader; return where the Python loop takes over.

    hiredis parses the commands (a fraction of a microsecond each, about a fifth of
    the Python loop's cost under ``redis-benchmark -P 16``) but neither says where
    each one ended nor refuses what redis refuses in a request (a status or an
    integer among the arguments, leading zeros in a length).  So each command's
    layout is checked against its parsed arguments: ``*N``, then per argument ``$``,
    exactly the length's digits, CRLF, the bytes, CRLF.  That both proves it is the
    strict form and gives its end.  At the first command that is not (or is
    incomplete, inline, an empty array or over the limits) it stops, and the
    Python loop, whose framing is the reference, goes on from there.
    """
    reader = _Reader()
    reader.feed(buf, pos)
    gets = reader.gets
    while True:
        try:
            args = gets()
        except Exception:  # noqa: BLE001 - hiredis.ProtocolError: the Python loop reports it
            return pos
        if type(args) is not list or not args or len(args) > MAX_ARGS:
            return pos
        n = len(args)
        p = pos + 1 + _digits(n)
        if buf[p] != 13 or buf[p + 1] != 10:
            return pos
        p += 2
        for arg in args:
            if type(arg) is not bytes or buf[p] != 36:  # $
                return pos
            size = len(arg)
            p += 1 + _digits(size)
            if buf[p] != 13 or buf[p + 1] != 10:
                return pos
            p += size + 4
            if buf[p - 2] != 13 or buf[p - 1] != 10:
                return pos
        raw = buf[pos:p]
        safe = plain.get(args[0])
        if safe is not None:
            out.append(LineRequest(raw, args[1] if n > 1 else None, safe))
        else:
            out.append(classify(args, raw))
        pos = p


#: The canonical heads of small arrays and bulk strings (``*N\r\n``, ``$N\r\n``).
_ARRAY_HEADS = [b"*%d\r\n" % n for n in range(64)]
_BULK_HEADS = [b"$%d\r\n" % n for n in range(1024)]
_CRLF = b"\r\n"


def _frameRun(buf: bytes, pos: int, plain: dict[bytes, bool], out: list[LineRequest]) -> int:
    """Frame the plain commands at the start of ``buf[pos:]`` as one ``LineRun``
    (a single one as its ``LineRequest``); return where the per-command framing
    takes over.

    hiredis parses the commands; their canonical encoding (``*N``, then per
    argument ``$LEN``, the bytes, CRLF: the only form the per-command framing
    accepts) is built for all of them at once and compared with the buffer in one
    go, which proves every command strict and gives the run's end, without the
    per-argument checks and the request object per command of ``_frameBurst``.
    Anything else (a command that is not plain, not an array of bulk strings, not
    canonical, incomplete) ends the run, or leaves it all to ``_frameBurst``.
    """
    reader = _Reader()
    reader.feed(buf, pos)
    gets = reader.gets
    commands: list[list[bytes]] = []
    parts: list[bytes] = []
    append = parts.append
    arrayHeads = _ARRAY_HEADS
    bulkHeads = _BULK_HEADS
    crlf = _CRLF
    while True:
        mark = len(parts)
        try:
            args = gets()
            if type(args) is not list or not args or args[0] not in plain:
                break
            n = len(args)
            append(arrayHeads[n] if n < 64 else b"*%d\r\n" % n)
            for arg in args:
                size = len(arg)
                append(bulkHeads[size] if size < 1024 else b"$%d\r\n" % size)
                append(arg)
                append(crlf)
        except Exception:  # noqa: BLE001 - hiredis.ProtocolError, a non-bytes argument
            del parts[mark:]
            break
        commands.append(args)
    if not commands:
        return pos
    try:
        canonical = b"".join(parts)
    except TypeError:  # an argument was not bytes (a nested array)
        return pos
    if not buf.startswith(canonical, pos):
        return pos
    end = pos + len(canonical)
    if len(commands) == 1:  # unpipelined: no run, and no second parse by _frameBurst
        args = commands[0]
        out.append(LineRequest(buf[pos:end], args[1] if len(args) > 1 else None, plain[args[0]]))
    else:
        out.append(LineRun(buf[pos:end], len(commands), partial(_splitRun, commands, plain)))
    return end


def _splitRun(commands: list[list[bytes]], plain: dict[bytes, bool]) -> list[LineRequest]:
    """The single requests of a run ``_frameRun`` made (each was canonical)."""
    return [LineRequest(encode(args), args[1] if len(args) > 1 else None, plain[args[0]])
            for args in commands]


class RedisRequestParser:
    """Frames one app connection's RESP2 stream into requests.

    The common request, an array of bulk strings naming a command that needs no
    more than its name and first argument to route (GET, SET, INCR, HGET, ...), is
    framed in one pass over the buffer: the lengths are checked, only the name and
    the key are copied, and the request itself is one slice of the buffer.  Any
    other command is parsed whole and classified by ``classify``.
    """

    def __init__(self, hashing: bool) -> None:
        self.hashing = hashing
        #: May ``feed`` hand out a ``LineRun`` (set by the route, see ``LineRun``)?
        self.runs = False
        self.plain = _plainCommands(hashing)
        self.stream = Stream()
        self.failed = False

    def feed(self, data: bytes) -> list[LineRequest]:
        if self.failed:
            return []
        stream = self.stream
        stream.feed(data)
        if stream.size < stream.need:
            return []
        buf = stream.join()
        pos = stream.pos
        size = len(buf)
        find = buf.find
        plain = self.plain
        out: list[LineRequest] = []
        need = 0  # > 0: the buffer length needed to frame the request at pos
        try:
            if _Reader is not None and buf[pos] == 42 and size - pos <= FAST_BURST:
                if self.runs:
                    pos = _frameRun(buf, pos, plain, out)
                if pos < size and buf[pos] == 42:
                    pos = _frameBurst(buf, pos, plain, self.classify, out)
            while pos < size:
                if buf[pos] != 42:  # not *: an inline command
                    eol = find(b"\n", pos)
                    if eol < 0:
                        if size - pos > MAX_LINE:
                            raise ProtocolError("inline request too long")
                        need = size + 1
                        break
                    args = buf[pos:eol].split()
                    pos = eol + 1
                    if args:
                        out.append(self.classify(args, encode(args)))
                    continue
                eol = find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_LINE:
                        raise ProtocolError("request line too long")
                    need = size + 1
                    break
                text = buf[pos + 1:eol]
                if text[:1] == b"0" and len(text) > 1:
                    # redis refuses "*01" (and then closes the connection: a pooled
                    # member connection, every app's requests in flight on it lost)
                    raise ProtocolError("leading zero in an array length")
                n = int(text) if text.isdigit() else _number(text)
                if n > MAX_ARGS:
                    raise ProtocolError("too many arguments")
                p = eol + 2
                if n <= 0:  # redis skips empty arrays too
                    pos = p
                    continue
                name = key = None
                for i in range(n):
                    if p >= size:
                        need = p + 1
                        break
                    if buf[p] != 36:  # $
                        raise ProtocolError("expected a bulk string")
                    eol = find(b"\r\n", p)
                    if eol < 0:
                        if size - p > MAX_LINE:
                            raise ProtocolError("bulk header too long")
                        need = size + 1
                        break
                    text = buf[p + 1:eol]
                    if not text.isdigit() or (text[0] == 48 and len(text) > 1):  # redis refuses "$04"
                        raise ProtocolError("bad bulk length")
                    start = eol + 2
                    end = start + int(text)
                    if end - start > MAX_BULK:
                        raise ProtocolError("bad bulk length")
                    if end + 2 > size:
                        need = end + 2
                        break
                    if buf[end] != 13 or buf[end + 1] != 10:
                        raise ProtocolError("bulk string not ended by CRLF")
                    if i == 0:
                        name = buf[start:end]
                    elif i == 1:
                        key = buf[start:end]
                    p = end + 2
                else:
                    raw = buf[pos:p]
                    safe = plain.get(name)  # type: ignore[arg-type]
                    if safe is not None:
                        out.append(LineRequest(raw, key, safe))
                    else:
                        out.append(self.classify(_arguments(raw), raw))
                    pos = p
                    continue
                break  # incomplete
        except (ProtocolError, ValueError):  # ValueError: int() of a length with 4300+ digits
            self.failed = True
            out.append(LineRequest.failing(PROTOCOL_ERROR, close=True))
            return out
        stream.consume(pos)
        if need:
            stream.wait(need)
        return out

    def classify(self, args: list[bytes], raw: bytes) -> LineRequest:
        name = args[0].upper()
        key = args[1] if len(args) > 1 else None
        if len(self.plain) < _PLAIN_MAX and _isPlain(name, self.hashing):
            self.plain[args[0]] = name in READ_ONLY
        if name in ALWAYS_UNSUPPORTED:
            return LineRequest(raw, error=UNSUPPORTED, info=args)
        if name == b"HELLO" and args[1:] not in ([], [b"2"]):
            # RESP3, AUTH or SETNAME would change a pooled connection for everyone
            return LineRequest(raw, error=UNSUPPORTED, info=args)
        if name == b"QUIT":
            return LineRequest(raw, localReply=_OK, close=True, info=args)
        if self.hashing:
            if name in HASH_UNSUPPORTED and not (name in (b"SUNION", b"SINTER", b"SDIFF") and len(args) <= 2):
                return LineRequest(raw, error=UNSUPPORTED, info=args)
            if name in SCRIPTS:
                if len(args) < 3 or not args[2].isdigit():
                    return LineRequest(raw, error=UNSUPPORTED, info=args)
                if int(args[2]) > 0:
                    return LineRequest(raw, error=UNSUPPORTED, info=args)
                key = None
            if name in SPLIT:
                keys = args[2::2] if name == b"MSET" else args[1:]
                if len(keys) > 1 and (name != b"MSET" or len(args) % 2 == 1):
                    return LineRequest(raw, key, name in READ_ONLY, keys=keys, info=args)
        if name in (b"XREAD", b"XREADGROUP") and b"BLOCK" in (a.upper() for a in args):
            return LineRequest(raw, error=UNSUPPORTED, info=args)
        return LineRequest(raw, key, name in READ_ONLY, info=args)


class RedisResponseParser:
    """Frames one member connection's stream into RESP2 replies."""

    def __init__(self) -> None:
        self.stream = Stream()

    def feed(self, data: bytes) -> None:
        self.stream.feed(data)

    def next(self, kind: Any) -> bytes | None:
        got, reply = self.many(1)
        return reply if got else None

    def many(self, n: int) -> tuple[int, bytes]:
        """Frame up to ``n`` replies: how many, and their bytes (one slice): the
        replies of a pipelined burst go back to its app as one piece, without a
        call, a stream update and a slice per reply.  The common replies (status,
        error, bulk string) are framed here; the rest, and anything odd or
        incomplete, by ``replyEnd``.  A reply that does not frame after some did is
        left for the next call to report.
        """
        stream = self.stream
        if stream.size < stream.need:
            return 0, b""
        buf = stream.join()
        pos = start = stream.pos
        size = len(buf)
        find = buf.find
        got = 0
        while got < n and pos < size:
            end = 0
            first = buf[pos]
            if first == 36:  # $
                eol = find(b"\r\n", pos)
                if eol >= 0:
                    text = buf[pos + 1:eol]
                    if text.isdigit() and len(text) <= 20:
                        end = eol + 4 + int(text)
                        if end > size or buf[end - 2] != 13 or buf[end - 1] != 10:
                            end = 0
            elif first == 43 or first == 45:  # + -
                eol = find(b"\r\n", pos)
                if eol >= 0:
                    end = eol + 2
            if end <= 0:
                try:
                    end = replyEnd(buf, pos)
                except _Incomplete as e:
                    stream.consume(pos)
                    stream.wait(e.need)
                    return got, buf[start:pos]
                except ProtocolError:
                    if not got:
                        raise
                    break
            pos = end
            got += 1
        stream.consume(pos)
        if start == 0 and pos == size:
            return got, buf
        return got, buf[start:pos]


@implementer(IPlugin, ILineDialect)
class RedisDialect:
    """The ``redis`` dialect plugin."""

    name = "redis"
    healthCheck = b"*1\r\n$4\r\nPING\r\n"

    def requestParser(self, route: Any) -> RedisRequestParser:
        return RedisRequestParser(route.balance == "hash")

    def responseParser(self) -> RedisResponseParser:
        return RedisResponseParser()

    def errorReply(self, reason: str) -> bytes:
        return b"-ERR ambassador %s\r\n" % reason.encode()

    def split(
        self, request: LineRequest, ownerOf: Callable[[bytes], Any]
    ) -> tuple[list[LineRequest], Callable[[list[bytes]], bytes]] | None:
        args: list[bytes] = request.info
        name = args[0].upper()
        merge = SPLIT[name]
        step = 2 if name == b"MSET" else 1
        groups: dict[Any, list[int]] = {}
        for i in range(1, len(args), step):
            groups.setdefault(ownerOf(args[i]), []).append(i)
        if len(groups) == 1:
            return None
        parts = []
        positions = []
        for indexes in groups.values():
            partArgs = [args[0]]
            for i in indexes:
                partArgs.extend(args[i:i + step])
            parts.append(LineRequest(encode(partArgs), args[indexes[0]], request.safe, info=partArgs))
            positions.append([(i - 1) // step for i in indexes])
        count = (len(args) - 1) // step

        if merge == "array":
            def mergeReplies(replies: list[bytes]) -> bytes:
                values: list[bytes] = [b""] * count
                for where, reply in zip(positions, replies):
                    items = arrayItems(reply)
                    if items is None or len(items) != len(where):
                        return reply
                    for i, item in zip(where, items):
                        values[i] = item
                return b"*%d\r\n%s" % (count, b"".join(values))
        elif merge == "sum":
            def mergeReplies(replies: list[bytes]) -> bytes:
                total = 0
                for reply in replies:
                    if not reply.startswith(b":"):
                        return reply
                    total += int(reply[1:-2])
                return b":%d\r\n" % total
        else:
            def mergeReplies(replies: list[bytes]) -> bytes:
                for reply in replies:
                    if reply != _OK:
                        return reply
                return _OK

        return parts, mergeReplies


redisDialect = RedisDialect()
