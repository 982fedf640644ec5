"""The dialects' parsers, fuzzed with hypothesis: any split of a valid stream frames
the same, and garbage never crashes or hangs a parser (SPEC §4/line)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from ambassador.config import Route
from ambassador.interfaces import ILineDialect
from ambassador.protocols.line import LineRun, LineRequest, ProtocolError
from ambassador.protocols.line.memcached import LINE, STATS, VALUES, memcachedDialect
from ambassador.protocols.line.plain import plainDialect
from ambassador.protocols.line.redis import encode, redisDialect

ROUTE = Route(name="r", protocol="line", listen="tcp:1", upstreams=("tcp:h:1",))
HASHED = Route(name="r", protocol="line", listen="tcp:1", upstreams=("tcp:h:1",), balance="hash")

arg = st.binary(max_size=40)
word = st.binary(min_size=1, max_size=12).filter(lambda b: b.split() == [b])


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def frame(parser, pieces):  # type: ignore[no-untyped-def]
    out: list[LineRequest] = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    return [(r.raw, r.key, r.safe, r.kind, r.expectsReply, r.error, r.close) for r in out]


def frameReplies(parser, pieces, kinds):  # type: ignore[no-untyped-def]
    replies = []
    kinds = list(kinds)
    for piece in pieces:
        parser.feed(piece)
        while kinds:
            reply = parser.next(kinds[0])
            if reply is None:
                break
            replies.append(reply)
            kinds.pop(0)
    return replies


def test_dialects_provide_the_interface() -> None:
    for dialect in (plainDialect, redisDialect, memcachedDialect):
        assert verifyObject(ILineDialect, dialect)


# --- redis --------------------------------------------------------------------------

command = st.lists(arg, min_size=1, max_size=5).map(lambda a: [b"GET", *a])
inline = st.lists(word, min_size=1, max_size=4).filter(lambda ws: not ws[0].startswith(b"*")).map(lambda ws: b" ".join(ws) + b"\r\n")


@st.composite
def respReply(draw, depth=0):  # type: ignore[no-untyped-def]
    kinds = ["simple", "error", "int", "bulk", "null"] + (["array", "nullarray"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "simple":
        return b"+" + draw(word) + b"\r\n"
    if kind == "error":
        return b"-ERR " + draw(word) + b"\r\n"
    if kind == "int":
        return b":%d\r\n" % draw(st.integers(-10**12, 10**12))
    if kind == "bulk":
        value = draw(arg)
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if kind == "null":
        return b"$-1\r\n"
    if kind == "nullarray":
        return b"*-1\r\n"
    items = draw(st.lists(respReply(depth + 1), max_size=4))
    return b"*%d\r\n%s" % (len(items), b"".join(items))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(command.map(encode), inline), min_size=1, max_size=10),
       st.lists(st.integers(0, 10**6), max_size=12))
def test_redis_requests_frame_the_same_however_split(requests, cuts) -> None:
    data = b"".join(requests)
    whole = frame(redisDialect.requestParser(ROUTE), [data])
    assert frame(redisDialect.requestParser(ROUTE), splitAt(data, cuts)) == whole
    assert len(whole) == len(requests)
    assert all(error is None for *_, error, _ in whole)


@settings(max_examples=100, deadline=None)
@given(st.lists(respReply(), min_size=1, max_size=10), st.lists(st.integers(0, 10**6), max_size=12))
def test_redis_replies_frame_the_same_however_split(replies, cuts) -> None:
    data = b"".join(replies)
    kinds = [None] * len(replies)
    assert frameReplies(redisDialect.responseParser(), splitAt(data, cuts), kinds) == replies


def frameMany(parser, pieces, counts):  # type: ignore[no-untyped-def]
    """The replies as ``many`` hands them out, burst by burst (``counts`` replies
    each), as bytes per burst; the rest of ``pieces`` is left unframed."""
    bursts: list[bytes] = []
    counts = list(counts)
    got, held = 0, []
    for piece in pieces:
        parser.feed(piece)
        while counts:
            n, data = parser.many(counts[0] - got)
            if n:
                held.append(data)
                got += n
            if got < counts[0]:
                break
            bursts.append(b"".join(held))
            counts.pop(0)
            got, held = 0, []
    return bursts


@settings(max_examples=150, deadline=None)
@given(st.lists(respReply(), min_size=1, max_size=12), st.lists(st.integers(0, 10**6), max_size=12),
       st.lists(st.integers(1, 5), min_size=1, max_size=12))
def test_redis_replies_frame_the_same_many_at_a_time(replies, cuts, sizes) -> None:
    """``many`` (a burst's replies at once) frames exactly what ``next`` does, one by
    one, however the stream is split and however the replies group into bursts."""
    counts = []
    left = len(replies)
    for size in sizes:
        if not left:
            break
        counts.append(min(size, left))
        left -= counts[-1]
    if left:
        counts.append(left)
    expected, at = [], 0
    for count in counts:
        expected.append(b"".join(replies[at:at + count]))
        at += count
    data = b"".join(replies)
    assert frameMany(redisDialect.responseParser(), splitAt(data, cuts), counts) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(respReply(), max_size=4), st.binary(max_size=30), st.lists(st.integers(0, 10**6), max_size=6))
def test_redis_many_frames_and_refuses_exactly_what_next_does(replies, junk, cuts) -> None:
    """Good replies then anything: ``many`` hands out the replies ``next`` frames, and
    refuses (after handing out the good ones) exactly when ``next`` refuses."""
    data = b"".join(replies) + junk
    one = redisDialect.responseParser()
    one.feed(data)
    reference: list[bytes] = []
    refused = False
    try:
        while (reply := one.next(None)) is not None:
            reference.append(reply)
    except ProtocolError:
        refused = True
    parser = redisDialect.responseParser()
    got: list[bytes] = []
    manyRefused = False
    try:
        for piece in splitAt(data, cuts):
            parser.feed(piece)
            while True:
                n, chunk = parser.many(3)
                if not n:
                    break
                got.append(chunk)
    except ProtocolError:
        manyRefused = True
    assert b"".join(got) == b"".join(reference)
    assert manyRefused == refused


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10))
def test_redis_garbage_never_crashes(pieces) -> None:
    parser = redisDialect.requestParser(HASHED)
    for piece in pieces:
        for request in parser.feed(piece):
            assert isinstance(request, LineRequest)
    responses = redisDialect.responseParser()
    try:
        frameReplies(responses, pieces, [None] * 20)
    except ProtocolError:
        pass


def test_redis_malformed_request_ends_with_protocol_error_and_close() -> None:
    parser = redisDialect.requestParser(ROUTE)
    requests = parser.feed(b"*1\r\n$4\r\nPING\r\n*1\r\n:1\r\n*1\r\n$4\r\nPING\r\n")
    assert [(r.error, r.close) for r in requests] == [(None, False), ("protocol-error", True)]
    assert parser.feed(b"*1\r\n$4\r\nPING\r\n") == []


def test_redis_safety_keys_and_splitting() -> None:
    parser = redisDialect.requestParser(HASHED)
    get, setCommand, mget, msetnx, evalKeys, eval0 = parser.feed(
        encode([b"get", b"k"]) + encode([b"SET", b"k", b"v"]) + encode([b"MGET", b"a", b"b"])
        + encode([b"MSETNX", b"a", b"1"]) + encode([b"EVAL", b"s", b"1", b"k"])
        + encode([b"EVAL", b"s", b"0"])
    )
    assert (get.key, get.safe, setCommand.safe) == (b"k", True, False)
    assert mget.keys == [b"a", b"b"] and mget.safe
    assert msetnx.error == "unsupported" and evalKeys.error == "unsupported"
    assert eval0.error is None
    parts, merge = redisDialect.split(mget, lambda key: key)
    assert [p.raw for p in parts] == [encode([b"MGET", b"a"]), encode([b"MGET", b"b"])]
    assert merge([b"*1\r\n$1\r\nA\r\n", b"*1\r\n$-1\r\n"]) == b"*2\r\n$1\r\nA\r\n$-1\r\n"
    assert redisDialect.split(mget, lambda key: "same") is None


# --- memcached ----------------------------------------------------------------------

# (memcached reads a line as a C string: a key with NUL is no key, see memcached.py)
key = st.binary(min_size=1, max_size=20).filter(
    lambda b: b.split() == [b] and b"\x80" not in b[:1] and b"\x00" not in b)


@st.composite
def memcachedRequest(draw):  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["get", "set", "cas", "delete", "incr", "version"]))
    noreply = draw(st.booleans())
    suffix = b" noreply" if noreply else b""
    if kind == "get":
        return b"get " + b" ".join(draw(st.lists(key, min_size=1, max_size=4))) + b"\r\n"
    if kind in ("set", "cas"):
        data = draw(st.binary(max_size=40))
        cas = b" 7" if kind == "cas" else b""
        return b"%s %s 1 0 %d%s%s\r\n%s\r\n" % (kind.encode(), draw(key), len(data), cas, suffix, data)
    if kind == "delete":
        return b"delete " + draw(key) + suffix + b"\r\n"
    if kind == "incr":
        return b"incr %s 5%s\r\n" % (draw(key), suffix)
    return b"version\r\n"


@st.composite
def memcachedReply(draw):  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from([VALUES, LINE, STATS]))
    if kind == VALUES:
        blocks = []
        for k in draw(st.lists(key, max_size=3)):
            data = draw(st.binary(max_size=30)) + draw(st.sampled_from([b"", b"END\r\n", b"\r\n"]))
            blocks.append(b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(data), data))
        end = draw(st.sampled_from([b"END\r\n", b"SERVER_ERROR out of memory\r\n"]))
        return kind, b"".join(blocks) + end
    if kind == STATS:
        return kind, b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"
    return kind, draw(st.sampled_from([b"STORED\r\n", b"NOT_FOUND\r\n", b"12\r\n", b"VERSION 1.6\r\n"]))


@settings(max_examples=100, deadline=None)
@given(st.lists(memcachedRequest(), min_size=1, max_size=10), st.lists(st.integers(0, 10**6), max_size=12))
def test_memcached_requests_frame_the_same_however_split(requests, cuts) -> None:
    data = b"".join(requests)
    whole = frame(memcachedDialect.requestParser(ROUTE), [data])
    assert frame(memcachedDialect.requestParser(ROUTE), splitAt(data, cuts)) == whole
    assert [raw for raw, *_ in whole] == requests
    assert all(error is None for *_, error, _ in whole)


@settings(max_examples=100, deadline=None)
@given(st.lists(memcachedReply(), min_size=1, max_size=10), st.lists(st.integers(0, 10**6), max_size=12))
def test_memcached_replies_frame_the_same_however_split(replies, cuts) -> None:
    data = b"".join(r for _, r in replies)
    kinds = [k for k, _ in replies]
    assert frameReplies(memcachedDialect.responseParser(), splitAt(data, cuts), kinds) == [
        r for _, r in replies
    ]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10), st.lists(st.sampled_from([VALUES, LINE, STATS]), max_size=10))
def test_memcached_garbage_never_crashes(pieces, kinds) -> None:
    parser = memcachedDialect.requestParser(HASHED)
    for piece in pieces:
        for request in parser.feed(piece):
            assert isinstance(request, LineRequest)
    try:
        frameReplies(memcachedDialect.responseParser(), pieces, kinds)
    except ProtocolError:
        pass


def test_memcached_noreply_and_split_get() -> None:
    parser = memcachedDialect.requestParser(HASHED)
    setNoreply, get = parser.feed(b"set k 0 0 1 noreply\r\nx\r\nget a b c\r\n")
    assert (setNoreply.expectsReply, setNoreply.safe) == (False, False)
    assert get.keys == [b"a", b"b", b"c"] and get.safe
    parts, merge = memcachedDialect.split(get, lambda k: k == b"b")
    assert [p.raw for p in parts] == [b"get a c\r\n", b"get b\r\n"]
    assert merge([b"VALUE c 0 1\r\nC\r\nEND\r\n", b"VALUE b 0 1\r\nB\r\nEND\r\n"]) == (
        b"VALUE b 0 1\r\nB\r\nVALUE c 0 1\r\nC\r\nEND\r\n"
    )


# --- line ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"), min_size=1,
                max_size=10), st.lists(st.integers(0, 10**6), max_size=12))
def test_plain_lines_frame_the_same_however_split(lines, cuts) -> None:
    data = b"".join(lines)
    route = Route(name="r", protocol="line", listen="tcp:1", upstreams=("tcp:h:1",),
                  options={"idempotent": True})
    whole = frame(plainDialect.requestParser(route), [data])
    assert frame(plainDialect.requestParser(route), splitAt(data, cuts)) == whole
    assert [raw for raw, *_ in whole] == lines
    assert all(safe for _, _, safe, *_ in whole)
    assert frameReplies(plainDialect.responseParser(), splitAt(data, cuts), [None] * len(lines)) == lines


# --- hiredis framing (ambassador.protocols.line.redis._frameBurst) against the Python loop

#: RESP elements a client may slip into a request array: redis refuses all but bulk
#: strings, so the route must too, whichever of its two framings sees them.
oddElement = st.sampled_from([
    b"+OK\r\n", b":5\r\n", b"-ERR x\r\n", b"$-1\r\n", b"*1\r\n$1\r\na\r\n", b"$03\r\nabc\r\n",
    b"=15\r\ntxt:Some string\r\n", b"%1\r\n$1\r\na\r\n$1\r\nb\r\n", b"_\r\n", b"#t\r\n",
    b",1.5\r\n", b"(12\r\n", b"$+3\r\nabc\r\n", b"$3\r\nabcd\r\n",
])
bulk = arg.map(lambda a: b"$%d\r\n%s\r\n" % (len(a), a))
element = st.one_of(bulk, bulk, bulk, oddElement)
header = st.sampled_from([b"*%d\r\n", b"*0%d\r\n", b"*+%d\r\n", b"*%d \r\n"])


@st.composite
def requestStream(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        elements = draw(st.lists(element, min_size=0, max_size=4))
        head = draw(st.one_of(st.just(b"*%d\r\n"), header))
        out.append(head % len(elements) + b"".join(elements))
    stream = b"".join(out)
    return stream[:draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream


@settings(max_examples=300, deadline=None)
@given(requestStream(), st.booleans())
def test_hiredis_framing_is_exactly_the_python_framing(stream, hashing) -> None:
    import ambassador.protocols.line.redis as redis

    route = HASHED if hashing else ROUTE
    fast = frame(redisDialect.requestParser(route), [stream])
    reader, redis._Reader = redis._Reader, None
    try:
        reference = frame(redisDialect.requestParser(route), [stream])
    finally:
        redis._Reader = reader
    assert fast == reference


def expand(requests):  # type: ignore[no-untyped-def]
    """Runs (``LineRun``) replaced by the single requests they stand for."""
    out = []
    for request in requests:
        if isinstance(request, LineRun):
            singles = request.split()
            assert len(singles) == request.count and b"".join(r.raw for r in singles) == request.raw
            out.extend(singles)
        else:
            out.append(request)
    return out


name = st.sampled_from([b"GET", b"SET", b"INCR", b"get", b"Nope"]).map(lambda n: b"$%d\r\n%s\r\n" % (len(n), n))


@st.composite
def commandStream(draw: st.DrawFn) -> bytes:
    """Mostly canonical commands named by known plain commands, now and then odd."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        elements = [draw(name)] + draw(st.lists(st.one_of(bulk, bulk, bulk, bulk, bulk, oddElement), max_size=3))
        head = draw(st.one_of(st.just(b"*%d\r\n"), st.just(b"*%d\r\n"), st.just(b"*%d\r\n"), header))
        out.append(head % len(elements) + b"".join(elements))
    stream = b"".join(out)
    return stream[:draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream


@settings(max_examples=300, deadline=None)
@given(commandStream(), st.lists(st.integers(0, 10**6), max_size=4))
def test_runs_frame_exactly_the_python_framing(stream, cuts) -> None:
    """A parser allowed runs frames the same requests (once its runs are split) as the
    reference Python framing, however the stream arrives; a run is never made of a
    request the reference would refuse or answer itself."""
    import ambassador.protocols.line.redis as redis

    for warm in (b"GET", b"SET", b"INCR", b"get"):  # the plain-command cache knows them
        redisDialect.requestParser(ROUTE).feed(encode([warm, b"k"]))
    parser = redisDialect.requestParser(ROUTE)
    parser.runs = True
    got: list[LineRequest] = []
    for piece in splitAt(stream, cuts):
        got.extend(parser.feed(piece))
    fast = [(r.raw, r.key, r.safe, r.kind, r.expectsReply, r.error, r.close) for r in expand(got)]
    reader, redis._Reader = redis._Reader, None
    try:
        reference = frame(redisDialect.requestParser(ROUTE), splitAt(stream, cuts))
    finally:
        redis._Reader = reader
    assert fast == reference
