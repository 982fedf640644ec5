"""The generic ``line`` dialect from outside: the real twistd and a line echo server."""

from __future__ import annotations

import socket

from harness import Ambassador, freePort
from peers import Peer
from redis_peer import RawClient


def _echo(peer: Peer, conn: socket.socket) -> None:
    with conn.makefile("rb") as lines:
        for line in lines:
            peer.record(line)
            conn.sendall(b"ECHO " + line)


def _dropFirstRequest(peer: Peer, conn: socket.socket) -> None:
    """The first connection reads one request and dies without answering; later
    connections echo."""
    with peer.lock:
        first = peer.accepted == 1
    if first:
        with conn.makefile("rb") as lines:
            peer.record(lines.readline())
        conn.close()
        return
    _echo(peer, conn)


def _config(listen: int, upstream: str, idempotent: bool | None) -> str:
    text = (
        '[defaults.retry]\nbackoff_base = "10ms"\n'
        '[[route]]\nname = "echo"\nprotocol = "line"\n'
        f'listen = "tcp:{listen}"\nupstreams = ["{upstream}"]\n'
    )
    if idempotent is not None:
        text += f"idempotent = {str(idempotent).lower()}\n"
    return text


def _lines(n: int):  # type: ignore[no-untyped-def]
    return lambda buffer: buffer.count(b"\n") >= n


def test_lines_are_relayed_in_order_pipelined(tmp_path) -> None:
    peer = Peer(_echo)
    listen = freePort()
    try:
        with Ambassador(tmp_path, config=_config(listen, peer.address, None)):
            client = RawClient(listen)
            client.send(b"".join(b"line %d\n" % i for i in range(300)) + b"crlf\r\n")
            reply = client.readUntil(_lines(301))
            assert reply == b"".join(b"ECHO line %d\n" % i for i in range(300)) + b"ECHO crlf\r\n"
            client.send(b"x" * (70 * 1024))  # no newline within 64 KiB: malformed
            assert client.readUntil(_lines(1)) == b"ERROR ambassador protocol-error\r\n"
            assert client.closedByPeer()
            client.close()
    finally:
        peer.stop()


def test_not_idempotent_request_lost_in_flight_fails_with_reset(tmp_path) -> None:
    peer = Peer(_dropFirstRequest)
    listen = freePort()
    try:
        with Ambassador(tmp_path, config=_config(listen, peer.address, False)) as amb:
            client = RawClient(listen)
            client.send(b"charge 10\n")
            assert client.readUntil(_lines(1)) == b"ERROR ambassador reset\r\n"
            client.send(b"charge 20\n")  # the connection is still usable
            assert client.readUntil(_lines(1)) == b"ECHO charge 20\n"
            client.close()
            assert peer.received == [b"charge 10\n", b"charge 20\n"]
            amb.waitForLog(r"echo tcp:\S+ attempts=1 result=reset")
    finally:
        peer.stop()


def test_idempotent_request_lost_in_flight_is_replayed(tmp_path) -> None:
    peer = Peer(_dropFirstRequest)
    listen = freePort()
    try:
        with Ambassador(tmp_path, config=_config(listen, peer.address, True)) as amb:
            client = RawClient(listen)
            client.send(b"lookup 10\n")
            assert client.readUntil(_lines(1)) == b"ECHO lookup 10\n"
            client.close()
            assert peer.received == [b"lookup 10\n", b"lookup 10\n"]
            amb.waitForLog(r"echo tcp:\S+ attempts=2 result=ok")
    finally:
        peer.stop()
