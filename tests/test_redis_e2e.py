"""The redis dialect from outside: the real twistd, a real redis-server, real clients
(redis-py, redis-cli, raw sockets)."""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import threading
import time

import pytest
from harness import Ambassador, freePort
from redis_peer import RawClient, redisServer

redis = pytest.importorskip("redis")


def _client(port: int) -> redis.Redis:
    # RESP2 (SPEC §4/line): redis-py 8 speaks RESP3 unless told otherwise.
    return redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=10)


def encode(args: list[str]) -> bytes:
    from ambassador.protocols.line.redis import encode as _encode

    return _encode([a.encode() for a in args])


def _complete(buffer: bytes, n: int) -> bool:
    """Are there n complete RESP replies in buffer?"""
    from ambassador.protocols.line.redis import _Incomplete, replyEnd

    pos = 0
    for _ in range(n):
        try:
            pos = replyEnd(buffer, pos)
        except _Incomplete:
            return False
    return True


@pytest.fixture(scope="module", params=["access-log", "bursts"])
def routed(request, tmp_path_factory):
    """A redis-server and an ambassador routing to it: (server, listen port, ambassador).
    Twice: with the access log on (the default: each request on its own) and off
    (pipelined requests go to the member as bursts)."""
    tmp = tmp_path_factory.mktemp("redis")
    server = redisServer()
    listen = freePort()
    config = (
        '[[route]]\nname = "cache"\nprotocol = "line"\ndialect = "redis"\n'
        f'listen = "tcp:{listen}"\nupstreams = ["{server.address}"]\n'
        f'access_log = {"false" if request.param == "bursts" else "true"}\n'
    )
    amb = Ambassador(tmp, config=config)
    amb.accessLogged = request.param != "bursts"  # type: ignore[attr-defined]
    try:
        yield server, listen, amb
    finally:
        amb.stop()
        server.stop()


def test_set_get_and_every_reply_type_byte_for_byte(routed) -> None:
    server, listen, amb = routed
    r = _client(listen)
    assert r.set("greeting", "hello") is True
    assert r.get("greeting") == b"hello"
    # The same commands straight to redis and through the ambassador: the same bytes.
    commands = [
        b"SET t:s v", b"GET t:s", b"GET t:missing", b"INCR t:n", b"PING", b"RPUSH t:l a b c",
        b"LRANGE t:l 0 -1", b"HSET t:h f v", b"HGETALL t:h", b"LPUSH t:s x",  # -WRONGTYPE
        b"EVAL \"return {1,{2,'two',{3}},'x'}\" 0",  # nested arrays
        b"XREAD COUNT 1 STREAMS t:nostream 0",  # null array (*-1)
        b"EVAL \"return redis.call('GET', 't:missing')\" 0",  # null bulk
        b"DEL t:s t:n t:l t:h",
    ]
    wire = b"".join(encode(shlex.split(c.decode())) for c in commands)
    wire += b"PING\r\n"  # an inline command too
    commands.append(b"PING")
    answers = []
    for port in (server.port, listen, server.port):
        client = RawClient(port)
        client.send(wire)
        answers.append(client.readUntil(lambda b: _complete(b, len(commands))))
        client.close()
    direct, proxied, _ = answers
    assert proxied == direct
    assert b"-WRONGTYPE" in proxied and b"*-1\r\n" in proxied and b"$-1\r\n" in proxied
    assert b"*3\r\n:1\r\n*3\r\n:2\r\n$3\r\ntwo\r\n*1\r\n:3\r\n$1\r\nx\r\n" in proxied


def test_thousand_pipelined_commands_answered_in_order(routed) -> None:
    _, listen, _ = routed
    r = _client(listen)
    pipe = r.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"p:{i}", i)
        pipe.get(f"p:{i}")
    results = pipe.execute()
    assert len(results) == 1000
    assert results[0::2] == [True] * 500
    assert results[1::2] == [str(i).encode() for i in range(500)]
    # Many app connections at once, each pipelining: each reads its own answers in order.
    errors: list[str] = []

    def worker(n: int) -> None:
        c = _client(listen)
        p = c.pipeline(transaction=False)
        for i in range(200):
            p.incr(f"w:{n}")
        if p.execute() != list(range(1, 201)):
            errors.append(f"worker {n} out of order")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_binary_safe_and_large_values(routed) -> None:
    server, listen, _ = routed
    r = _client(listen)
    binary = b"a\r\nb\r\n*1\r\n$3\r\n\x00\xff-ERR\r\n" * 10
    r.set(b"bin\r\nkey", binary)
    assert r.get(b"bin\r\nkey") == binary
    large = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB
    r.set("large", large)
    assert r.get("large") == large
    assert _client(server.port).strlen("large") == len(large)


def test_subscribe_is_unsupported_and_the_connection_still_works(routed) -> None:
    _, listen, _ = routed
    client = RawClient(listen)
    client.send(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n*1\r\n$4\r\nPING\r\n")
    assert client.readUntil(lambda b: _complete(b, 2)) == (
        b"-ERR ambassador unsupported\r\n+PONG\r\n"
    )
    for command in (b"MULTI", b"SELECT 1", b"BLPOP q 0", b"AUTH x", b"HELLO 3", b"MONITOR"):
        client.send(command + b"\r\n")
        assert client.readUntil(lambda b: _complete(b, 1)) == b"-ERR ambassador unsupported\r\n"
    client.send(b"PING\r\n")
    assert client.readUntil(lambda b: _complete(b, 1)) == b"+PONG\r\n"
    client.close()


def test_an_app_that_half_closes_gets_every_answer(routed) -> None:
    _, listen, _ = routed
    client = RawClient(listen)
    client.send(b"PING\r\n" * 50 + b"*2\r\n$4\r\nECHO\r\n$3\r\nend\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closedByPeer()
    assert client.buffer == b"+PONG\r\n" * 50 + b"$3\r\nend\r\n"
    client.close()


def test_malformed_request_gets_protocol_error_then_close(routed) -> None:
    _, listen, amb = routed
    client = RawClient(listen)
    client.send(b"*1\r\n$4\r\nPING\r\n*2\r\n:12\r\n")
    assert client.readUntil(lambda b: _complete(b, 2)) == (
        b"+PONG\r\n-ERR ambassador protocol-error\r\n"
    )
    assert client.closedByPeer()
    client.close()
    if amb.accessLogged:
        amb.waitForLog(r"access#info\] cache None attempts=0 result=protocol-error")


def test_redis_cli_through_the_route(routed) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    _, listen, amb = routed
    run = lambda *args: subprocess.run(
        ["redis-cli", "-p", str(listen), *args], capture_output=True, timeout=10, check=True,
    ).stdout
    assert run("SET", "cli", "works") == b"OK\n"
    assert run("GET", "cli") == b"works\n"
    assert run("SUBSCRIBE", "x").startswith(b"ERR ambassador unsupported")
    if amb.accessLogged:
        lines = amb.waitForLog(r"access#info\] cache tcp:127\.0\.0\.1:\d+ attempts=1 result=ok")
        assert lines


def test_over_max_connections_gets_overloaded(tmp_path) -> None:
    with redisServer() as server:
        listen = freePort()
        config = (
            '[[route]]\nname = "small"\nprotocol = "line"\ndialect = "redis"\n'
            f'listen = "tcp:{listen}"\nupstreams = ["{server.address}"]\nmax_connections = 1\n'
        )
        with Ambassador(tmp_path, config=config) as amb:
            first = RawClient(listen)
            first.send(b"PING\r\n")
            assert first.readUntil(lambda b: _complete(b, 1)) == b"+PONG\r\n"
            second = RawClient(listen)
            assert second.readUntil(lambda b: _complete(b, 1)) == b"-ERR ambassador overloaded\r\n"
            assert second.closedByPeer()
            first.send(b"PING\r\n")
            assert first.readUntil(lambda b: _complete(b, 1)) == b"+PONG\r\n"
            first.close()
            second.close()
            amb.waitForLog(r"small None attempts=0 result=overloaded")


def test_member_killed_mid_load_reads_recover_and_writes_are_never_applied_twice(tmp_path) -> None:
    """SIGKILL redis under load and start it again on the same port: reads in flight
    are replayed and succeed; writes in flight fail with ``reset`` and are never
    replayed (a replayed write would land on the restarted, empty server)."""
    server = redisServer()
    listen = freePort()
    config = (
        '[defaults]\nconnect_timeout = "500ms"\ntimeout = "3s"\ndeadline = "8s"\n'
        '[defaults.retry]\nattempts = 8\nbackoff_base = "100ms"\nbackoff_max = "800ms"\n'
        "budget_ratio = 1.0\n"
        '[defaults.breaker]\nfailure_threshold = 1000\n'
        '[[route]]\nname = "chaos"\nprotocol = "line"\ndialect = "redis"\n'
        f'listen = "tcp:{listen}"\nupstreams = ["{server.address}"]\naccess_log = false\n'
    )
    stop = threading.Event()
    killed = threading.Event()
    outcomes: dict[str, list] = {"readErrors": [], "reset": [], "ok": [], "otherWriteErrors": []}
    lock = threading.Lock()

    def load(n: int) -> None:
        c = _client(listen)
        i = 0
        while not stop.is_set():
            i += 1
            ident = f"{n}-{i}"
            pipe = c.pipeline(transaction=False)
            pipe.rpush("log", ident)
            pipe.get("some-key")
            try:
                write, read = pipe.execute(raise_on_error=False)
            except redis.ConnectionError as e:  # pragma: no cover - would be a bug
                with lock:
                    outcomes["readErrors"].append(repr(e))
                return
            with lock:
                if isinstance(read, Exception):
                    outcomes["readErrors"].append((killed.is_set(), str(read)))
                if isinstance(write, Exception):
                    key = "reset" if "ambassador reset" in str(write) else "otherWriteErrors"
                    outcomes[key].append((ident, str(write)))
                else:
                    outcomes["ok"].append(ident)

    try:
        with Ambassador(tmp_path, config=config):
            threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(6)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            server.kill()
            killed.set()
            time.sleep(0.3)
            server.start()
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(20)
            assert not any(t.is_alive() for t in threads)
        # What the restarted server holds (read straight from it).
        after = [x.decode() for x in _client(server.port).lrange("log", 0, -1)]
    finally:
        server.stop()
    assert outcomes["readErrors"] == []
    assert outcomes["otherWriteErrors"] == [] or all(
        "connect-failure" in e or "deadline" in e for _, e in outcomes["otherWriteErrors"]
    )
    # Each write at most once, and no write the app was told failed with reset (it
    # was in flight at the kill; a replay would have landed on the restarted server).
    assert len(after) == len(set(after))
    resetIds = {ident for ident, _ in outcomes["reset"]}
    assert not resetIds & set(after)
    assert outcomes["ok"], "the load made progress"
