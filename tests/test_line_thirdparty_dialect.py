"""A line dialect from another package works with no change here (SPEC §9): a plugin
module under some sys.path entry's ``twisted/plugins/`` providing ``ILineDialect``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import Ambassador, freePort
from peers import Peer
from redis_peer import RawClient

#: The whole third-party package: the README's example of a dialect plugin.
SHOUT_PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.interfaces import ILineDialect
from ambassador.protocols.line import LineRequest
from ambassador.protocols.line.plain import PlainRequestParser, PlainResponseParser


class ShoutRequests(PlainRequestParser):
    """Lines, upper-cased on their way to the member; all safe to repeat."""

    def feed(self, data):
        return [
            LineRequest(r.raw.upper(), r.key, safe=True) if r.error is None else r
            for r in super().feed(data)
        ]


@implementer(IPlugin, ILineDialect)
class ShoutDialect:
    name = "shout"

    def requestParser(self, route):
        return ShoutRequests(idempotent=True)

    def responseParser(self):
        return PlainResponseParser()

    def errorReply(self, reason):
        return b"SHOUT-ERROR " + reason.encode() + b"\\n"

    def split(self, request, ownerOf):
        return None


shout = ShoutDialect()
'''


def _echo(peer: Peer, conn) -> None:  # type: ignore[no-untyped-def]
    with conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"ECHO " + line)


def test_a_dialect_plugin_from_another_package(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "twisted" / "plugins").mkdir(parents=True)
    (site / "twisted" / "plugins" / "shout_dialect.py").write_text(SHOUT_PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(site)}
    peer = Peer(_echo)
    listen = freePort()
    spec = f"line:shout tcp:{listen} {peer.address}"
    try:
        without = subprocess.run(
            [sys.executable, "-m", "ambassador", "check", "--route", spec],
            capture_output=True, text=True, timeout=60, check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        assert without.returncode == 1
        assert "unknown dialect 'shout'" in without.stdout + without.stderr
        with Ambassador(tmp_path, routes=[spec], env=env):
            client = RawClient(listen)
            client.send(b"hello\nworld\n")
            assert client.readUntil(lambda b: b.count(b"\n") >= 2) == b"ECHO HELLO\nECHO WORLD\n"
            client.close()
    finally:
        peer.stop()
