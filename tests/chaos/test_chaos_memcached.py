"""Chaos scenarios for the line route, memcached dialect: the real twistd, a real
memcached behind fault proxies, and a seeded, bounded load of real clients (issue 9).

The same books as ``test_chaos_redis.py`` (its :class:`LineLoad`, :func:`auditLine` and
rig), with the memcached text protocol: ``set`` of unique keys, ``get`` (one key or
several) of acknowledged ones, which must read back what was stored, ``incr`` counters
and ``append`` logs that tell whether a write was applied twice; and pymemcache beside
the raw pipelining clients.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_chaos_redis import (
    DEADLINE,
    SPEC_REASONS,
    ClientBooks,
    Dialect,
    Op,
    SideBooks,
    attemptsOf,
    auditLine,
    lineRig,
    runScenario,
    summary,
)

pymemcache = pytest.importorskip("pymemcache")
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheServerError

CLIENTS = 6
COUNTERS = 3
ERROR = b"SERVER_ERROR ambassador "


class MemcachedLoad(Dialect):
    errorPrefix = ERROR

    def batch(self, rng: random.Random, cid: int, seq: Iterator[int], acked: dict[str, bytes]) -> list[Op]:
        ops = []
        for _ in range(12):
            n = next(seq)
            kind = rng.choices(["set", "get", "mget", "incr", "log", "setq"], [3, 3, 1, 2, 2, 1])[0]
            if kind == "setq":
                # noreply: no answer, whatever happens to it (SPEC §4/line)
                key, token = f"q:{cid}:{n}", f"q{cid}.{n}"
                raw = b"set %s 0 0 %d noreply\r\n%s\r\n" % (key.encode(), len(token), token.encode())
                ops.append(Op("setq", key, raw, token=token, noreply=True))
            elif kind == "set":
                key, token = f"k:{cid}:{n}", f"v{cid}.{n}." + "x" * rng.choice((0, 10, 300))
                raw = b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(token), token.encode())
                ops.append(Op("set", key, raw, token=token))
            elif kind in ("get", "mget") and acked:
                keys = rng.sample(sorted(acked), min(len(acked), 1 if kind == "get" else 3))
                expect = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k.encode(), len(acked[k]), acked[k])
                                  for k in keys) + b"END\r\n"
                ops.append(Op("get", " ".join(keys), b"get %s\r\n" % " ".join(keys).encode(), expect=expect))
            elif kind in ("get", "mget"):
                key = f"never:{cid}:{n}"
                ops.append(Op("get", key, b"get %s\r\n" % key.encode(), expect=b"END\r\n"))
            elif kind == "incr":
                key = f"n:{cid}:{rng.randrange(COUNTERS)}"
                ops.append(Op("incr", key, b"incr %s 1\r\n" % key.encode()))
            else:
                key, token = f"log:{cid}", f"i{n}"
                data = b"," + token.encode()
                ops.append(Op("log", key, b"append %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(data), data),
                              token=token))
        return ops

    def replyEnd(self, buf: bytes, pos: int, op: Op) -> int | None:
        p = pos
        while True:
            eol = buf.find(b"\r\n", p)
            if eol < 0:
                return None
            if op.kind == "get" and buf.startswith(b"VALUE ", p):
                size = int(buf[p:eol].split()[3])
                p = eol + 2 + size + 2
                if p > len(buf):
                    return None
                continue
            return eol + 2  # END, STORED, a number, or an error line

    def judge(self, op: Op, reply: bytes) -> None:
        op.reply = reply
        if reply.startswith(ERROR):
            op.reason = reply[len(ERROR):-2].decode(errors="replace")
            op.verdict = "error" if op.reason in SPEC_REASONS else "wrong"
            op.detail = "not a SPEC reason" if op.verdict == "wrong" else ""
            return
        if op.kind in ("set", "log"):
            good = reply == b"STORED\r\n"
        elif op.kind == "get":
            good = reply == op.expect
        else:
            good = reply[:-2].isdigit()
            op.detail = reply[:-2].decode() if good else ""
        op.verdict = "ok" if good else "wrong"
        if not good:
            op.detail = f"reply {reply[:120]!r}"


def direct(port: int) -> Client:
    return Client(("127.0.0.1", port), timeout=10, connect_timeout=5)


def prepare(port: int) -> None:
    """The counters and logs the load appends to exist, empty, before it starts."""
    client = direct(port)
    for cid in range(CLIENTS):
        client.set(f"log:{cid}", b"", noreply=False)
        for i in range(COUNTERS):
            client.set(f"n:{cid}:{i}", b"0", noreply=False)
    client.close()


def auditMemcached(port: int) -> Callable[[list[ClientBooks]], list[str]]:
    def audit(books: list[ClientBooks]) -> list[str]:
        client = direct(port)
        try:
            return auditLine(
                books, DEADLINE, lambda key: client.get(key),
                counters=lambda stored: int(stored or 0),
                logItems=lambda stored: [item for item in (stored or b"").decode().split(",") if item],
            )
        finally:
            client.close()

    return audit


def pymemcacheSide(port: int, seed: int) -> Callable[[float, SideBooks], None]:
    """pymemcache: sets of unique keys, and get_many of acknowledged ones, which must
    read back what was stored; errors are the ambassador's, with a SPEC reason."""

    def reasonOf(error: Exception) -> str:
        text = error.args[0] if error.args else b""
        text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        reason = text.strip().removeprefix("ambassador ")
        assert reason in SPEC_REASONS, f"pymemcache got {error!r}"
        return reason

    def loop(seconds: float, books: SideBooks) -> None:
        rng = random.Random(seed)
        client = Client(("127.0.0.1", port), timeout=DEADLINE + 2, connect_timeout=5)
        stopAt = time.monotonic() + seconds
        acked: dict[str, bytes] = {}
        i = 0
        while time.monotonic() < stopAt:
            i += 1
            key, value = f"pm:{seed}:{i}", f"pv{i}".encode() * rng.randint(1, 20)
            try:
                assert client.set(key, value, noreply=False) is True
                acked[key] = value
                books.ok += 1
            except MemcacheServerError as e:
                books.reasons[reasonOf(e)] += 1
            keys = sorted(acked)[-3:]
            if keys:
                try:
                    got = client.get_many(keys)
                    assert got == {k: acked[k] for k in keys}, (keys, got)
                    books.ok += 1
                except MemcacheServerError as e:
                    books.reasons[reasonOf(e)] += 1
        client.close()

    return loop


@pytest.fixture
def memcachedMember():  # type: ignore[no-untyped-def]
    from redis_peer import memcachedServer

    server = memcachedServer()
    try:
        prepare(server.port)
        yield server
    finally:
        server.stop()


def test_resetsBetweenPipelinedReplies(tmp_path: Path, memcachedMember) -> None:
    """Member connections cut mid-pipeline, and requests reset after the member applied
    them: gets are replayed, sets/incr/append fail with ``reset`` and are never applied twice."""
    seed = 2101
    with lineRig(tmp_path, "memcached", memcachedMember.port, 2, seed, deadline=DEADLINE,
                 failureThreshold=1000) as rig:
        rig.proxies[0].schedule([
            (0.5, "random", {"p": 0.6, "modes": ["reset_mid_response"], "after": 40, "kill": True}),
            (0.5, "random", {"p": 0.6, "modes": ["reset_mid_response"], "after": 3000, "kill": True}),
        ])
        rig.proxies[1].schedule([
            (0.4, "random", {"p": 0.5, "modes": ["reset_before_response"], "forward": True, "kill": True}),
            (0.4, "pass", {}),
        ])
        books, _, metrics = runScenario(rig, MemcachedLoad(), seed, auditMemcached(memcachedMember.port),
                                        side=pymemcacheSide(rig.appPort, seed), clients=CLIENTS)
        assert rig.proxies[0].stats()["faults"].get("reset_mid_response", 0) > 0
        assert rig.proxies[1].stats()["faults"].get("reset_before_response", 0) > 0
        assert attemptsOf(metrics, rig.proxies[0].address, "reset") > 0
        assert summary(books)["reasons"].get("reset", 0) > 0, summary(books)
        reads = [op for book in books for op in book.ops if op.kind == "get"]
        assert sum(op.verdict == "ok" for op in reads) > 0.9 * len(reads), summary(books)


def test_blackholeLatencyAndAcceptClose(tmp_path: Path, memcachedMember) -> None:
    """One member blackholes now and then (its breaker opens, then closes), the other
    answers late at times and closes connections at once at others."""
    seed = 2202
    with lineRig(tmp_path, "memcached", memcachedMember.port, 2, seed, timeout="400ms",
                 deadline=DEADLINE) as rig:
        rig.proxies[0].schedule([(1.0, "pass", {}), (1.2, "blackhole", {"kill": True})])
        rig.proxies[1].schedule([
            # (long enough for the breaker that the kill opens to let a trial through)
            (0.8, "latency", {"ms": 120}), (1.5, "accept_close", {"kill": True}),
        ])
        books, monitor, metrics = runScenario(rig, MemcachedLoad(), seed, auditMemcached(memcachedMember.port),
                                              side=pymemcacheSide(rig.appPort, seed), clients=CLIENTS)
        assert rig.proxies[0].stats()["faults"].get("blackhole", 0) > 0
        assert rig.proxies[1].stats()["faults"].get("accept_close", 0) > 0
        assert attemptsOf(metrics, rig.proxies[0].address, "timeout") > 0
        assert monitor.maxBreaker.get(rig.proxies[0].address) == 2, monitor.maxBreaker
        assert summary(books)["verdicts"].get("ok", 0) > 0, summary(books)


def test_failedNoreplyRequestsGetNoAnswer(tmp_path: Path, memcachedMember) -> None:
    """A noreply request that fails (never connected, or reset after it was written)
    gets no answer: an error reply would be taken for the next request's (SPEC §4/line)."""
    from chaos.faultproxy import FaultProxy
    from harness import Ambassador, freePort
    from peers import refusingAddress
    from redis_peer import RawClient

    with FaultProxy(target=("127.0.0.1", memcachedMember.port), seed=1) as fp:
        refused, reset = freePort(), freePort()
        config = (
            '[defaults]\nconnect_timeout = "300ms"\ntimeout = "1s"\ndeadline = "2s"\n'
            '[defaults.retry]\nattempts = 1\n'
            f'[[route]]\nname = "refused"\nprotocol = "line"\ndialect = "memcached"\n'
            f'listen = "tcp:{refused}"\nupstreams = ["{refusingAddress()}"]\n'
            f'[[route]]\nname = "reset"\nprotocol = "line"\ndialect = "memcached"\n'
            f'listen = "tcp:{reset}"\nupstreams = ["{fp.address}"]\n'
        )
        with Ambassador(tmp_path, config=config):
            client = RawClient(refused)
            client.send(b"set a 0 0 1 noreply\r\nx\r\ndelete a noreply\r\nversion\r\n")
            assert client.readUntil(lambda b: b.count(b"\r\n") >= 1) == (
                b"SERVER_ERROR ambassador connect-failure\r\n")
            assert not client.closedByPeer(timeout=0.5) and client.buffer == b""
            client.close()
            fp.set("reset_before_response")
            client = RawClient(reset)
            client.send(b"set b 0 0 1 noreply\r\nx\r\n")
            time.sleep(0.5)  # written, then reset: failed, silently
            fp.set("pass")
            client.send(b"version\r\n")
            assert client.readUntil(lambda b: b.count(b"\r\n") >= 1).startswith(b"VERSION ")
            assert not client.closedByPeer(timeout=0.5) and client.buffer == b""
            client.close()
