"""``balance = "hash"`` over two real redis-servers, through the real twistd."""

from __future__ import annotations

import pytest
from harness import Ambassador, freePort
from redis_peer import RawClient, redisServer

redis = pytest.importorskip("redis")


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, protocol=2, socket_timeout=10)


def _config(listen: int, a: str, b: str) -> str:
    return (
        '[defaults]\nconnect_timeout = "500ms"\n'
        '[defaults.breaker]\nfailure_threshold = 1\nreset_timeout = "60s"\n'
        '[[route]]\nname = "ring"\nprotocol = "line"\ndialect = "redis"\nbalance = "hash"\n'
        f'listen = "tcp:{listen}"\nupstreams = ["{a}", "{b}"]\n'
    )


def test_keys_land_on_one_server_stably_multikey_merges_and_a_dead_server_moves_only_its_keys(
    tmp_path,
) -> None:
    a, b = redisServer(), redisServer()
    listen = freePort()
    keys = [f"user:{i}" for i in range(200)]
    try:
        with Ambassador(tmp_path, config=_config(listen, a.address, b.address)):
            r = _client(listen)
            for key in keys:
                r.set(key, key.upper())
        direct = {a.port: _client(a.port), b.port: _client(b.port)}
        owner = {}
        for key in keys:
            where = [port for port, c in direct.items() if c.exists(key)]
            assert len(where) == 1, f"{key} is on {where}"
            owner[key] = where[0]
        onA = [k for k in keys if owner[k] == a.port]
        onB = [k for k in keys if owner[k] == b.port]
        assert 40 < len(onA) < 160, "both members get a fair share"

        # A new ambassador process (same members) finds every key where it was.
        with Ambassador(tmp_path, config=_config(listen, a.address, b.address)):
            r = _client(listen)
            assert [r.get(k) for k in keys] == [k.upper().encode() for k in keys]
            # MGET across both members, with a missing key and a repeat, merged in order.
            asked = [onA[0], onB[0], "nope", onA[1], onB[0]]
            assert r.mget(asked) == [onA[0].upper().encode(), onB[0].upper().encode(), None,
                                     onA[1].upper().encode(), onB[0].upper().encode()]
            assert r.exists(onA[0], onB[0], "nope") == 2
            assert r.mset({"m:1": "x", "m:2": "y", "m:3": "z", "m:4": "w"}) is True
            assert r.mget(["m:1", "m:2", "m:3", "m:4"]) == [b"x", b"y", b"z", b"w"]
            assert r.delete("m:1", "m:2", "m:3", "m:4", "nope") == 4
            # Commands that cannot be split per member are refused, the connection kept.
            raw = RawClient(listen)
            raw.send(b"MSETNX a 1 b 2\r\nRENAME a b\r\nKEYS *\r\nPING\r\n")
            expected = b"-ERR ambassador unsupported\r\n" * 3 + b"+PONG\r\n"
            assert raw.readUntil(lambda buf: len(buf) >= len(expected)) == expected
            raw.close()

            # One member dies: its keys go to the other (reads find nothing there),
            # the other member's keys are untouched.
            b.kill()
            for key in onB[:20]:
                assert r.get(key) is None
            assert [r.get(k) for k in onA] == [k.upper().encode() for k in onA]
            r.set(onB[0], "moved")
            assert direct[a.port].get(onB[0]) == b"moved"
            assert r.mget([onA[0], onB[1]]) == [onA[0].upper().encode(), None]
    finally:
        a.stop()
        b.stop()
