"""The memcached dialect from outside: the real twistd, real memcached, pymemcache."""

from __future__ import annotations

import pytest
from harness import Ambassador, freePort
from redis_peer import RawClient, memcachedServer

pymemcache = pytest.importorskip("pymemcache")
from pymemcache.client.base import Client


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memcached")
    a, b = memcachedServer(), memcachedServer()
    one, ring = freePort(), freePort()
    config = (
        '[[route]]\nname = "mc"\nprotocol = "line"\ndialect = "memcached"\n'
        f'listen = "tcp:{one}"\nupstreams = ["{a.address}"]\n'
        '[[route]]\nname = "mcring"\nprotocol = "line"\ndialect = "memcached"\n'
        f'balance = "hash"\nlisten = "tcp:{ring}"\nupstreams = ["{a.address}", "{b.address}"]\n'
    )
    amb = Ambassador(tmp, config=config)
    try:
        yield a, b, one, ring, amb
    finally:
        amb.stop()
        a.stop()
        b.stop()


def test_set_get_multiget_delete_incr_cas(routed) -> None:
    a, _, one, _, amb = routed
    c = Client(("127.0.0.1", one), timeout=10)
    assert c.set("k1", b"v1", noreply=False) is True
    c.set("k2", b"v2")  # noreply: no answer, applied all the same
    assert c.get("k1") == b"v1"
    assert c.get_many(["k1", "k2", "nope"]) == {"k1": b"v1", "k2": b"v2"}
    assert c.delete("k1", noreply=False) is True
    assert c.get("k1") is None
    c.set("n", b"10", noreply=False)
    assert c.incr("n", 5) == 15
    assert c.decr("n", 3) == 12
    value, token = c.gets("n")
    assert value == b"12"
    assert c.cas("n", b"99", token, noreply=False) is True
    assert c.cas("n", b"77", token, noreply=False) is False  # EXISTS: token is stale
    assert c.get("n") == b"99"
    assert c.touch("n", 100, noreply=False) is True
    assert c.add("n", b"x", noreply=False) is False
    assert c.append("n", b"!", noreply=False) is True
    assert c.get("n") == b"99!"
    assert c.version()
    assert Client(("127.0.0.1", a.port)).get("n") == b"99!"
    amb.waitForLog(r"access#info\] mc tcp:127\.0\.0\.1:\d+ attempts=1 result=ok")


def test_data_block_containing_end_survives(routed) -> None:
    _, _, one, ring, _ = routed
    tricky = b"line\r\nEND\r\nVALUE x 0 3\r\nEND\r\n\r\n"
    for port in (one, ring):
        c = Client(("127.0.0.1", port), timeout=10)
        c.set("tricky", tricky, noreply=False)
        assert c.get("tricky") == tricky
        assert c.get_many(["tricky", "other"]) == {"tricky": tricky}


def test_multi_get_is_split_per_member_and_merged_under_hash(routed) -> None:
    a, b, _, ring, _ = routed
    c = Client(("127.0.0.1", ring), timeout=10)
    keys = [f"key{i}" for i in range(60)]
    for key in keys:
        c.set(key, key.encode() * 3, noreply=False)
    onA = Client(("127.0.0.1", a.port)).get_many(keys)
    onB = Client(("127.0.0.1", b.port)).get_many(keys)
    assert onA and onB and not set(onA) & set(onB)
    assert len(onA) + len(onB) == len(keys)
    assert c.get_many(keys + ["missing"]) == {k: k.encode() * 3 for k in keys}
    raw = RawClient(ring)
    raw.send(b"gets " + b" ".join(k.encode() for k in keys[:10]) + b"\r\n")
    reply = raw.readUntil(lambda buf: buf.endswith(b"END\r\n"))
    assert [line.split()[1] for line in reply.split(b"\r\n") if line.startswith(b"VALUE")] == [
        k.encode() for k in keys[:10]
    ]
    raw.close()


def test_unsupported_and_malformed(routed) -> None:
    _, _, one, _, _ = routed
    raw = RawClient(one)
    raw.send(b"mg foo v\r\nbogus command\r\nversion\r\n")
    reply = raw.readUntil(lambda buf: buf.count(b"\r\n") >= 3)
    assert reply.startswith(b"SERVER_ERROR ambassador unsupported\r\n" * 2 + b"VERSION ")
    raw.send(b"set k 0 0 notanumber\r\n")
    assert raw.readUntil(lambda buf: buf.endswith(b"\r\n")) == (
        b"SERVER_ERROR ambassador protocol-error\r\n"
    )
    assert raw.closedByPeer()
    raw.close()
