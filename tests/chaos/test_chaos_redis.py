"""Chaos scenarios for the line route, redis dialect: the real twistd, a real
redis-server behind fault proxies, and a seeded, bounded load of real clients (issue 9).

The clients (raw sockets that pipeline batches of commands, and redis-py) use keys and
values unique to each command, so that each reply can be matched to its request:

- ``SET k v`` gets ``+OK`` or the ambassador's ``-ERR ambassador REASON`` (a SPEC reason);
- ``GET k`` of a key whose SET was acknowledged in an earlier batch gets that very value
  (an acknowledged write is never lost, and no reply is another request's);
- ``INCR`` counters and ``RPUSH`` logs, one per client, tell whether a write was applied
  twice: a write answered OK is applied exactly once; one answered with ``reset``,
  ``timeout`` or ``deadline`` may or may not be applied, never twice; one refused before
  it was written (``breaker-open``, ``connect-failure``, ...) is not applied.

Every batch gets exactly as many replies as it had commands, in order, within the
deadline plus a slack, and nothing more; afterwards the ambassador's request metrics
count what the clients saw, the retry budget held, its file descriptors are back to its
baseline plus the pooled member connections the proxies still see, and its memory is in
bounds.  :class:`LineLoad` and :func:`auditLine` are the dialect-free part, used by
``test_chaos_memcached.py`` too.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from accounting import Monitor, fdCount, metricSum, rssBytes, scrapeMetrics, waitUntil
from chaos.faultproxy import FaultProxy
from harness import Ambassador, freePort

#: Load per scenario: each test stays well under 30 s (about 2 s to start, this, a few
#: seconds to settle).
LOAD_SECONDS = 3.0
#: A batch's replies may come this long after the deadline (scheduling, backoff rounding).
SLACK = 2.0
#: How much the RSS may grow over a scenario.
RSS_GROWTH = 64 * 1024 * 1024
#: Failure reasons a line route may answer with under member faults (SPEC §3).
SPEC_REASONS = {"connect-failure", "reset", "timeout", "deadline", "breaker-open", "budget-exhausted"}
#: Of those, the ones given to a request that may have reached a member.
MAYBE_APPLIED = {"reset", "timeout", "deadline", "budget-exhausted"}


@dataclass
class Op:
    """One command a client sent, and what came back."""

    kind: str
    key: str
    raw: bytes
    expect: bytes | None = None  # a value the reply must carry (GET of an acknowledged SET)
    token: str = ""
    reply: bytes | None = None
    reason: str | None = None  # the ambassador's error reason, if it answered itself
    verdict: str = "unanswered"  # ok | error | unanswered | wrong | noreply (none expected)
    noreply: bool = False  # the member never answers it (memcached noreply): nor may we
    detail: str = ""


@dataclass
class SideBooks:
    """What a library client (redis-py, pymemcache) saw: replies from the member, and
    the ambassador's error replies by reason."""

    ok: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    error: str = ""


@dataclass
class ClientBooks:
    """What one client sent, in order, and its counters' and logs' keys."""

    ops: list[Op] = field(default_factory=list)
    batchSeconds: list[float] = field(default_factory=list)
    extraBytes: list[bytes] = field(default_factory=list)
    reconnects: int = 0


class Dialect:
    """The dialect-specific part of the load: what to send, how replies end, what they mean."""

    errorPrefix: bytes

    def batch(self, rng: random.Random, cid: int, seq: Iterator[int], acked: dict[str, bytes]) -> list[Op]:
        raise NotImplementedError

    def replyEnd(self, buf: bytes, pos: int, op: Op) -> int | None:
        """The end of the reply to ``op`` that starts at ``pos``, or None if incomplete."""
        raise NotImplementedError

    def judge(self, op: Op, reply: bytes) -> None:
        """Set ``op.verdict`` (ok / error / wrong) and ``op.reason`` from its reply."""
        raise NotImplementedError


class LineLoad:
    """``clients`` raw-socket clients pipelining batches to 127.0.0.1:``port`` for
    ``seconds``, each with its own seeded ``random.Random``."""

    def __init__(self, port: int, dialect: Dialect, seconds: float, seed: int, deadline: float,
                 clients: int = 6, maxBatch: int = 12) -> None:
        self.port = port
        self.dialect = dialect
        self.seconds = seconds
        self.seed = seed
        self.deadline = deadline
        self.clients = clients
        self.maxBatch = maxBatch
        self.books = [ClientBooks() for _ in range(clients)]
        self.errors: list[str] = []

    def run(self) -> list[ClientBooks]:
        stopAt = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self._client, args=(i, stopAt), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + self.deadline + SLACK + 10)
        assert not any(t.is_alive() for t in threads), "a load client hung"
        assert not self.errors, self.errors[:5]
        return self.books

    def _client(self, cid: int, stopAt: float) -> None:
        try:
            self._clientLoop(cid, stopAt)
        except Exception as e:  # noqa: BLE001 (reported by run())
            self.errors.append(f"client {cid}: {type(e).__name__}: {e}")

    def _clientLoop(self, cid: int, stopAt: float) -> None:
        rng = random.Random(self.seed * 1000 + cid)
        books = self.books[cid]
        acked: dict[str, bytes] = {}
        seq = iter(range(10**9))
        sock: socket.socket | None = None
        bound = self.deadline + SLACK
        while time.monotonic() < stopAt:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ops = self.dialect.batch(rng, cid, seq, acked)[: rng.randint(1, self.maxBatch)]
            books.ops.extend(ops)
            started = time.monotonic()
            sock.sendall(b"".join(op.raw for op in ops))
            buf = b""
            pos = 0
            index = 0
            closed = False
            while index < len(ops):
                if ops[index].noreply:
                    ops[index].verdict = "noreply"
                    index += 1
                    continue
                end = self.dialect.replyEnd(buf, pos, ops[index])
                if end is not None:
                    self.dialect.judge(ops[index], buf[pos:end])
                    pos = end
                    index += 1
                    continue
                left = started + bound - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                buf += chunk
            books.batchSeconds.append(time.monotonic() - started)
            for op in ops[index:]:
                op.verdict = "unanswered"
                op.detail = "connection closed" if closed else f"no reply within {bound}s"
            if buf[pos:]:
                books.extraBytes.append(buf[pos:])
            if index < len(ops) or closed:
                sock.close()
                sock = None
                books.reconnects += 1
            for op in ops:
                if op.verdict == "ok" and op.kind == "set":
                    acked[op.key] = op.token.encode()
        if sock is not None:
            # nothing may follow the last batch's replies
            sock.settimeout(0.2)
            try:
                late = sock.recv(65536)
            except TimeoutError:
                late = b""
            if late:
                books.extraBytes.append(late)
            sock.close()


def auditLine(books: list[ClientBooks], deadline: float, final: Callable[[str], Any],
              counters: Callable[[Any], int], logItems: Callable[[Any], list[str]]) -> list[str]:
    """Every accounting rule of issue 9 the books break; empty when they balance.

    @param final: reads a key straight from the member (not through the ambassador).
    @param counters: a counter's final value from what ``final`` returned.
    @param logItems: a log's items from what ``final`` returned.
    """
    problems: list[str] = []
    for cid, book in enumerate(books):
        for op in book.ops:
            if op.verdict in ("unanswered", "wrong"):
                problems.append(f"client {cid} {op.raw[:60]!r}: {op.verdict} ({op.detail})")
        for extra in book.extraBytes:
            problems.append(f"client {cid}: bytes beyond one reply per command: {extra[:100]!r}")
        slow = [s for s in book.batchSeconds if s > deadline + SLACK]
        if slow:
            problems.append(f"client {cid}: batches answered after {max(slow):.2f}s > deadline + {SLACK}s")
        # Unsafe writes: each acknowledged one applied exactly once, none applied twice.
        byKey: dict[tuple[str, str], list[Op]] = {}
        for op in book.ops:
            if op.kind in ("incr", "log"):
                byKey.setdefault((op.kind, op.key), []).append(op)
        for (kind, key), ops in byKey.items():
            ok = [op for op in ops if op.verdict == "ok"]
            maybe = [op for op in ops if op.verdict in ("unanswered", "noreply") or op.reason in MAYBE_APPLIED]
            never = [op for op in ops if op.verdict == "error" and op.reason not in MAYBE_APPLIED]
            stored = final(key)
            if kind == "incr":
                value = counters(stored)
                seen = [int(op.detail) for op in ok]
                if len(set(seen)) != len(seen):
                    problems.append(f"{key}: two INCRs answered the same value: {sorted(seen)}")
                if seen and max(seen) > value:
                    problems.append(f"{key}: an INCR answered {max(seen)} > final {value}")
                if not len(ok) <= value <= len(ok) + len(maybe):
                    problems.append(
                        f"{key}: final {value} outside [{len(ok)} acknowledged, {len(ok) + len(maybe)} "
                        f"acknowledged or maybe applied] (an INCR applied twice, or a lost one); "
                        f"never written: {len(never)}")
            else:
                items = logItems(stored)
                counts = Counter(items)
                twice = [item for item, n in counts.items() if n > 1]
                if twice:
                    problems.append(f"{key}: items applied twice: {twice[:5]}")
                for op in ok:
                    if counts[op.token] != 1:
                        problems.append(f"{key}: acknowledged {op.token} applied {counts[op.token]} times")
                for op in never:
                    if counts[op.token]:
                        problems.append(f"{key}: {op.token} refused ({op.reason}) but applied")
                sent = {op.token for op in ops}
                stray = [item for item in counts if item not in sent]
                if stray:
                    problems.append(f"{key}: items no client sent: {stray[:5]}")
    return problems


def auditMetrics(books: list[ClientBooks], metrics: dict[Any, float], route: str,
                 extra: SideBooks | None = None, splitOkAttempts: tuple[int, int] = (0, 0)) -> list[str]:
    """The ambassador's request counters against what the clients saw.

    @param splitOkAttempts: the least and most successful attempts beyond one per
        successful request that split commands made (a part per member, each an attempt).
    """
    problems: list[str] = []
    extra = extra or SideBooks()
    ops = [op for book in books for op in book.ops]
    verdicts = Counter(op.verdict for op in ops)
    ok = verdicts["ok"] + extra.ok
    # noreply requests count too (SPEC §4/line), with a result the client never sees
    silent = verdicts["noreply"]
    okMetric = metricSum(metrics, "ambassador_requests_total", route=route, result="ok")
    if not ok <= okMetric <= ok + silent:
        problems.append(f"requests_total{{result=ok}} {okMetric:.0f} != {ok} replies from the member"
                        f" (+ up to {silent} noreply requests)")
    byReason = Counter(op.reason for op in ops if op.verdict == "error") + extra.reasons
    for reason, count in byReason.items():
        seen = metricSum(metrics, "ambassador_requests_total", route=route, result=reason)
        if not count <= seen <= count + silent:
            problems.append(f"requests_total{{result={reason}}} {seen:.0f} != {count} replies the clients saw"
                            f" (+ up to {silent} noreply requests)")
    total = metricSum(metrics, "ambassador_requests_total", route=route)
    answered = verdicts["ok"] + verdicts["error"] + extra.ok + sum(extra.reasons.values())
    if total != answered + silent:
        results = {dict(labels).get("result"): v for (name, labels), v in metrics.items()
                   if name == "ambassador_requests_total" and ("route", route) in labels}
        problems.append(f"requests_total {total:.0f} != {answered} answered + {silent} noreply requests"
                        f" (by result: {results}; clients saw {dict(Counter(op.reason for op in ops))})")
    okAttempts = metricSum(metrics, "ambassador_attempts_total", route=route, result="ok")
    low, high = okMetric + splitOkAttempts[0], okMetric + splitOkAttempts[1]
    if not low <= okAttempts <= high:
        problems.append(f"attempts_total{{result=ok}} {okAttempts:.0f} outside [{low:.0f}, {high:.0f}]: "
                        "one successful attempt per successful request (or split part)")
    retries = metricSum(metrics, "ambassador_retries_total", route=route)
    failedAttempts = metricSum(metrics, "ambassador_attempts_total", route=route) - okAttempts
    if retries > failedAttempts:
        problems.append(f"retries_total {retries:.0f} > {failedAttempts:.0f} failed attempts")
    return problems


def summary(books: list[ClientBooks]) -> dict[str, Any]:
    ops = [op for book in books for op in book.ops]
    return {
        "commands": len(ops),
        "verdicts": dict(Counter(op.verdict for op in ops)),
        "reasons": dict(Counter(op.reason for op in ops if op.verdict == "error")),
        "reconnects": sum(book.reconnects for book in books),
        "maxBatchSeconds": round(max((s for book in books for s in book.batchSeconds), default=0.0), 3),
    }


# --- the rig -----------------------------------------------------------------------------


@dataclass
class Rig:
    ambassador: Ambassador
    proxies: list[FaultProxy]
    appPort: int
    adminPort: int
    deadline: float
    fdBaseline: int = 0
    rssBaseline: int = 0

    @property
    def pid(self) -> int:
        return self.ambassador.process.pid


@contextmanager
def lineRig(tmp_path: Path, dialect: str, memberPort: int | list[int], proxies: int, seed: int,
            timeout: str = "800ms", deadline: float = 2.5, failureThreshold: int = 5,
            balance: str = "round_robin") -> Iterator[Rig]:
    """One twistd with one line route ("chaos") over ``proxies`` fault proxies in front
    of one real member (they share its data: a retry on another proxy sees the same
    keys), or of one member each when ``memberPort`` is a list."""
    ports = memberPort if isinstance(memberPort, list) else [memberPort] * proxies
    with ExitStack() as stack:
        fps = [stack.enter_context(FaultProxy(target=("127.0.0.1", ports[i]), seed=seed + i))
               for i in range(proxies)]
        appPort, adminPort = freePort(), freePort()
        upstreams = ", ".join(f'"{fp.address}"' for fp in fps)
        config = f"""
[defaults]
connect_timeout = "300ms"
timeout = "{timeout}"
deadline = "{deadline}s"
idle_timeout = "3s"

[defaults.retry]
attempts = 3
backoff_base = "20ms"
backoff_max = "200ms"
budget_ratio = 0.5
budget_min_per_second = 5

[defaults.breaker]
failure_threshold = {failureThreshold}
reset_timeout = "1s"
half_open_max = 1

[[route]]
name = "chaos"
protocol = "line"
dialect = "{dialect}"
balance = "{balance}"
listen = "tcp:{appPort}"
upstreams = [{upstreams}]
access_log = false
"""
        ambassador = stack.enter_context(Ambassador(
            tmp_path, config=config, args=["--admin", f"tcp:{adminPort}:interface=127.0.0.1"]))
        rig = Rig(ambassador, fps, appPort, adminPort, deadline)
        scrapeMetrics(adminPort)
        rig.fdBaseline = settledFds(rig.pid)
        rig.rssBaseline = rssBytes(rig.pid)
        yield rig


def settledFds(pid: int) -> int:
    previous = fdCount(pid)
    for _ in range(20):
        time.sleep(0.1)
        current = fdCount(pid)
        if current == previous:
            return current
        previous = current
    return previous


def runScenario(rig: Rig, dialect: Dialect, seed: int, audit: Callable[[list[ClientBooks]], list[str]],
                side: Callable[[float, SideBooks], None] | None = None, clients: int = 6,
                splitOkAttempts: Callable[[list[ClientBooks]], tuple[int, int]] | None = None,
                ) -> tuple[list[ClientBooks], Monitor, dict]:
    """Run the load (and ``side``, a library client's loop that keeps its books in a
    SideBooks), then check every rule that holds whatever the faults."""
    sideBooks = SideBooks()
    sideThread = None

    def runSide() -> None:
        try:
            side(LOAD_SECONDS, sideBooks)  # type: ignore[misc]
        except BaseException as e:  # noqa: BLE001 (reported below)
            sideBooks.error = f"{type(e).__name__}: {e}"

    if side is not None:
        sideThread = threading.Thread(target=runSide, daemon=True)
    with Monitor(rig) as monitor:
        if sideThread is not None:
            sideThread.start()
        books = LineLoad(rig.appPort, dialect, LOAD_SECONDS, seed, rig.deadline, clients=clients).run()
        if sideThread is not None:
            sideThread.join(LOAD_SECONDS + rig.deadline + SLACK + 10)
            assert not sideThread.is_alive(), "the library client hung"
            assert not sideBooks.error, f"the library client: {sideBooks.error}"
    ops = sum(len(book.ops) for book in books)
    assert ops > 100, f"the load sent only {ops} commands"
    answered = (sum(op.verdict in ("ok", "error", "noreply") for book in books for op in book.ops)
                + sideBooks.ok + sum(sideBooks.reasons.values()))
    try:
        waitUntil(lambda: metricSum(scrapeMetrics(rig.adminPort), "ambassador_requests_total",
                                    route="chaos") >= answered, 5)
    except TimeoutError:
        pass  # auditMetrics reports it
    metrics = scrapeMetrics(rig.adminPort)
    split = splitOkAttempts(books) if splitOkAttempts is not None else (0, 0)
    problems = audit(books) + auditMetrics(books, metrics, "chaos", sideBooks, split)
    assert not monitor.errors, monitor.errors[:5]
    assert not monitor.budgetViolations, f"retries over the budget: {monitor.budgetViolations[:3]}"
    assert monitor.maxRss - rig.rssBaseline < RSS_GROWTH, (monitor.maxRss, rig.rssBaseline)
    assert not problems, "\n".join(problems[:30]) + f"\n{summary(books)}"
    checkFdsBack(rig)
    assert rig.ambassador.process.poll() is None
    return books, monitor, metrics


def checkFdsBack(rig: Rig) -> None:
    """Once the clients are gone, the only fds over the baseline are pooled member
    connections, each of which a proxy still sees open."""

    def accountedFor() -> bool:
        held = sum(fp.stats()["open"] for fp in rig.proxies)
        return fdCount(rig.pid) - rig.fdBaseline <= held

    try:
        waitUntil(accountedFor, 8)
    except TimeoutError:
        raise AssertionError(
            f"fds {fdCount(rig.pid)} - baseline {rig.fdBaseline} > the "
            f"{[fp.stats()['open'] for fp in rig.proxies]} member connections the proxies see"
        ) from None


def attemptsOf(metrics: dict, upstream: str, result: str) -> float:
    return metricSum(metrics, "ambassador_attempts_total", route="chaos", upstream=upstream, result=result)


# --- redis --------------------------------------------------------------------------------

from ambassador.protocols.line.redis import _Incomplete, encode, replyEnd


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class RedisLoad(Dialect):
    errorPrefix = b"-ERR ambassador "

    def batch(self, rng: random.Random, cid: int, seq: Iterator[int], acked: dict[str, bytes]) -> list[Op]:
        ops = []
        for _ in range(12):
            n = next(seq)
            kind = rng.choices(["set", "get", "incr", "log", "echo"], [3, 3, 2, 2, 1])[0]
            if kind == "set":
                key, token = f"k:{cid}:{n}", f"v{cid}.{n}." + "x" * rng.choice((0, 10, 200))
                ops.append(Op("set", key, encode([b"SET", key.encode(), token.encode()]), token=token))
            elif kind == "get" and acked:
                key = rng.choice(sorted(acked))
                ops.append(Op("get", key, encode([b"GET", key.encode()]), expect=acked[key]))
            elif kind == "get":
                key = f"never:{cid}:{n}"
                ops.append(Op("get", key, encode([b"GET", key.encode()]), expect=None))
            elif kind == "incr":
                key = f"n:{cid}:{rng.randrange(3)}"
                ops.append(Op("incr", key, encode([b"INCR", key.encode()])))
            elif kind == "log":
                key, token = f"log:{cid}", f"i{n}"
                ops.append(Op("log", key, encode([b"RPUSH", key.encode(), token.encode()]), token=token))
            else:
                token = f"e{cid}.{n}"
                ops.append(Op("echo", token, encode([b"ECHO", token.encode()]), expect=token.encode()))
        return ops

    def replyEnd(self, buf: bytes, pos: int, op: Op) -> int | None:
        try:
            return replyEnd(buf, pos)
        except _Incomplete:
            return None

    def judge(self, op: Op, reply: bytes) -> None:
        op.reply = reply
        if reply.startswith(self.errorPrefix):
            op.reason = reply[len(self.errorPrefix):-2].decode(errors="replace")
            op.verdict = "error" if op.reason in SPEC_REASONS else "wrong"
            op.detail = "not a SPEC reason" if op.verdict == "wrong" else ""
            return
        good = False
        if op.kind == "set":
            good = reply == b"+OK\r\n"
        elif op.kind in ("get", "echo"):
            good = reply == (_bulk(op.expect) if op.expect is not None else b"$-1\r\n")
        elif op.kind in ("incr", "log"):
            good = reply[:1] == b":" and reply[1:-2].isdigit()
            op.detail = reply[1:-2].decode() if good else ""
        op.verdict = "ok" if good else "wrong"
        if not good:
            op.detail = f"reply {reply[:80]!r}"


redis = pytest.importorskip("redis")


def redisFinal(port: int) -> Callable[[str], Any]:
    client = redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=10)

    def final(key: str) -> Any:
        if key.startswith("log:"):
            return client.lrange(key, 0, -1)
        return client.get(key)

    return final


def auditRedis(port: int) -> Callable[[list[ClientBooks]], list[str]]:
    return lambda books: auditLine(
        books, 0.0 + DEADLINE, redisFinal(port),
        counters=lambda stored: int(stored or 0),
        logItems=lambda stored: [item.decode() for item in stored],
    )


def redisPySide(port: int, seed: int) -> Callable[[float, SideBooks], None]:
    """redis-py, pipelining SETs of unique keys and GETs of acknowledged ones (which
    must read back what was written); errors are the ambassador's, with a SPEC reason."""

    def ambassadorReason(error: Exception) -> str:
        reason = str(error).removeprefix("ambassador ")
        assert reason in SPEC_REASONS, f"redis-py got {error!r}"
        return reason

    def loop(seconds: float, books: SideBooks) -> None:
        rng = random.Random(seed)
        # (no CLIENT SETINFO on connect: CLIENT is unsupported through a pooled proxy)
        options = {"host": "127.0.0.1", "port": port, "protocol": 2, "socket_timeout": DEADLINE + SLACK}
        try:
            client = redis.Redis(**options, driver_info=None)  # redis-py 8
        except TypeError:
            client = redis.Redis(**options, lib_name=None, lib_version=None)
        stopAt = time.monotonic() + seconds
        acked: dict[str, str] = {}
        i = 0
        while time.monotonic() < stopAt:
            pipe = client.pipeline(transaction=False)
            keys = []
            for _ in range(rng.randint(1, 8)):
                i += 1
                key, value = f"py:{seed}:{i}", f"pv{i}"
                pipe.set(key, value)
                keys.append((key, value))
            checks = sorted(acked)[-3:]
            for key in checks:
                pipe.get(key)
            results = pipe.execute(raise_on_error=False)
            assert len(results) == len(keys) + len(checks)
            for (key, value), result in zip(keys, results):
                if isinstance(result, Exception):
                    books.reasons[ambassadorReason(result)] += 1
                else:
                    assert result is True, result
                    acked[key] = value
                    books.ok += 1
            for key, result in zip(checks, results[len(keys):]):
                if isinstance(result, Exception):
                    books.reasons[ambassadorReason(result)] += 1
                else:
                    assert result == acked[key].encode(), (key, result)
                    books.ok += 1
        client.close()

    return loop


DEADLINE = 2.5


@pytest.fixture
def redisMember():  # type: ignore[no-untyped-def]
    from redis_peer import redisServer

    server = redisServer()
    try:
        yield server
    finally:
        server.stop()


def test_resetsBetweenPipelinedReplies(tmp_path: Path, redisMember) -> None:
    """Member connections cut after a few replies (mid-pipeline), and requests reset
    after the member applied them: reads are replayed, writes fail with ``reset`` and
    are never applied twice."""
    seed = 1101
    # One reset fails every request in flight on the connection, dozens when pipelined:
    # a threshold this high keeps the breakers out of it (they have their own scenario).
    with lineRig(tmp_path, "redis", redisMember.port, 2, seed, deadline=DEADLINE,
                 failureThreshold=1000) as rig:
        # Pooled member connections live long: kill=True resets them at each step (itself
        # a reset between pipelined replies) so that new ones draw their fate again.
        rig.proxies[0].schedule([
            (0.5, "random", {"p": 0.6, "modes": ["reset_mid_response"], "after": 60, "kill": True}),
            (0.5, "random", {"p": 0.6, "modes": ["reset_mid_response"], "after": 3000, "kill": True}),
        ])
        rig.proxies[1].schedule([
            (0.4, "random", {"p": 0.5, "modes": ["reset_before_response"], "forward": True, "kill": True}),
            (0.4, "pass", {}),
        ])
        books, _, metrics = runScenario(rig, RedisLoad(), seed, auditRedis(redisMember.port),
                                        side=redisPySide(rig.appPort, seed))
        assert rig.proxies[0].stats()["faults"].get("reset_mid_response", 0) > 0
        assert rig.proxies[1].stats()["faults"].get("reset_before_response", 0) > 0
        assert attemptsOf(metrics, rig.proxies[0].address, "reset") > 0
        reasons = summary(books)["reasons"]
        assert reasons.get("reset", 0) > 0, summary(books)  # writes were cut, and told so
        reads = [op for book in books for op in book.ops if op.kind in ("get", "echo")]
        assert sum(op.verdict == "ok" for op in reads) > 0.9 * len(reads), summary(books)


def test_blackholeFlapping(tmp_path: Path, redisMember) -> None:
    """One member goes silent (accepts, reads, never answers) now and then: attempts time
    out, its breaker opens and closes again, the other member carries the load."""
    seed = 1202
    with lineRig(tmp_path, "redis", redisMember.port, 2, seed, timeout="400ms", deadline=DEADLINE) as rig:
        rig.proxies[0].schedule([(1.0, "pass", {}), (1.2, "blackhole", {"kill": True})])
        books, monitor, metrics = runScenario(rig, RedisLoad(), seed, auditRedis(redisMember.port))
        assert rig.proxies[0].stats()["faults"].get("blackhole", 0) > 0
        assert attemptsOf(metrics, rig.proxies[0].address, "timeout") > 0
        assert monitor.maxBreaker.get(rig.proxies[0].address) == 2, monitor.maxBreaker
        assert monitor.maxBreaker.get(rig.proxies[1].address, 0) == 0, monitor.maxBreaker
        verdicts = summary(books)["verdicts"]
        assert verdicts.get("ok", 0) > 0.6 * sum(verdicts.values()), summary(books)


def test_latencyAndAcceptClose(tmp_path: Path, redisMember) -> None:
    """Latency around the attempt timeout on one member (a timed-out write is never sent
    again), accept-and-close on the other."""
    seed = 1303
    with lineRig(tmp_path, "redis", redisMember.port, 2, seed, timeout="500ms", deadline=DEADLINE) as rig:
        rig.proxies[0].schedule([(0.8, "latency", {"ms": 150}), (0.8, "latency", {"ms": 300})])
        rig.proxies[1].schedule([(0.7, "pass", {}), (0.5, "accept_close", {"kill": True})])
        books, _, metrics = runScenario(rig, RedisLoad(), seed, auditRedis(redisMember.port),
                                        side=redisPySide(rig.appPort, seed))
        assert attemptsOf(metrics, rig.proxies[0].address, "timeout") > 0
        assert rig.proxies[1].stats()["faults"].get("accept_close", 0) > 0
        assert summary(books)["verdicts"].get("ok", 0) > 0


class RedisHashLoad(RedisLoad):
    """Under ``balance = "hash"``: also MGET of acknowledged keys and MSET of new ones,
    which the route splits per member and merges."""

    def batch(self, rng: random.Random, cid: int, seq: Iterator[int], acked: dict[str, bytes]) -> list[Op]:
        ops = super().batch(rng, cid, seq, acked)
        for i in range(len(ops)):
            roll = rng.random()
            if roll < 0.15 and len(acked) >= 2:
                keys = rng.sample(sorted(acked), min(len(acked), rng.randint(2, 4)))
                expect = b"*%d\r\n" % len(keys) + b"".join(_bulk(acked[k]) for k in keys)
                ops[i] = Op("mget", " ".join(keys), encode([b"MGET", *(k.encode() for k in keys)]),
                            expect=expect)
            elif roll < 0.25:
                n = next(seq)
                pairs = [(f"m:{cid}:{n}:{j}", f"mv{cid}.{n}.{j}") for j in range(rng.randint(2, 4))]
                args = [b"MSET"] + [x.encode() for pair in pairs for x in pair]
                # acknowledged as a whole: each of its keys may be read back after an OK
                ops[i] = Op("mset", " ".join(k for k, _ in pairs), encode(args),
                            token="\n".join(v for _, v in pairs))
        return ops

    def judge(self, op: Op, reply: bytes) -> None:
        if op.kind == "mget":
            op.reply = reply
            if reply.startswith(self.errorPrefix):
                super().judge(op, reply)
                return
            op.verdict = "ok" if reply == op.expect else "wrong"
            if op.verdict == "wrong":
                op.detail = f"reply {reply[:120]!r}, expected {op.expect[:120]!r}"  # type: ignore[index]
            return
        if op.kind == "mset":
            op.kind = "set"
            super().judge(op, reply)
            op.kind = "mset"
            return
        super().judge(op, reply)


def test_hashSplitCommandsUnderResets(tmp_path: Path) -> None:
    """``balance = "hash"`` over two redis-servers (each its own data), member
    connections cut mid-pipeline: MGET and MSET split per member and merged come back
    whole or as one error reply, every key on exactly one member, reads read writes."""
    from redis_peer import redisServer

    seed = 1404
    with redisServer() as a, redisServer() as b, lineRig(
        tmp_path, "redis", [a.port, b.port], 2, seed, deadline=DEADLINE, failureThreshold=1000,
        balance="hash",
    ) as rig:
        for fp in rig.proxies:
            fp.schedule([
                (0.5, "random", {"p": 0.5, "modes": ["reset_mid_response"], "after": 80, "kill": True}),
                (0.5, "random", {"p": 0.3, "modes": ["reset_before_response"], "forward": True,
                                 "kill": True}),
            ])
        clients = [redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=10)
                   for port in (a.port, b.port)]

        def final(key: str) -> Any:
            found = [c.lrange(key, 0, -1) if key.startswith("log:") else c.get(key) for c in clients]
            held = [f for f in found if f]
            assert len(held) <= 1, f"{key} is on both members: {found}"
            return held[0] if held else found[0]

        def audit(books: list[ClientBooks]) -> list[str]:
            problems = auditLine(books, DEADLINE, final, counters=lambda stored: int(stored or 0),
                                 logItems=lambda stored: [item.decode() for item in stored or []])
            for book in books:
                for op in book.ops:
                    if op.kind == "mset" and op.verdict == "ok":
                        keys = op.key.split(" ")
                        values = [c.mget(keys) for c in clients]
                        for i, (key, value) in enumerate(zip(keys, op.token.split("\n"))):
                            stored = [v[i] for v in values if v[i] is not None]
                            if stored != [value.encode()]:
                                problems.append(f"MSET acknowledged but {key} holds {stored!r}")
            return problems

        def splitOkAttempts(books: list[ClientBooks]) -> tuple[int, int]:
            """An acknowledged MGET/MSET made one successful attempt per member its keys
            live on; a refused one, up to one per key but one."""
            keys = sorted({k for book in books for op in book.ops if op.kind in ("mget", "mset")
                           and op.verdict == "ok" for k in op.key.split(" ")})
            held = []
            for c in clients:
                pipe = c.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                held.append(dict(zip(keys, pipe.execute())))
            where = lambda key: next((i for i, h in enumerate(held) if h[key]), None)
            low = high = 0
            for book in books:
                for op in book.ops:
                    if op.kind not in ("mget", "mset"):
                        continue
                    keys = op.key.split(" ")
                    if op.verdict == "ok":
                        parts = len({where(k) for k in keys}) - 1
                        low, high = low + parts, high + parts
                    else:
                        high += len(keys) - 1
            return low, high

        books, _, _ = runScenario(rig, RedisHashLoad(), seed, audit,
                                        splitOkAttempts=splitOkAttempts)
        kinds = Counter((op.kind, op.verdict) for book in books for op in book.ops)
        assert kinds[("mget", "ok")] > 0 and kinds[("mset", "ok")] > 0, kinds
        assert summary(books)["reasons"].get("reset", 0) > 0, summary(books)
        # both members hold keys: the ring spread them
        assert clients[0].dbsize() > 0 and clients[1].dbsize() > 0
