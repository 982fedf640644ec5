"""Certificate rotation without a restart: SIGHUP re-reads the TLS files (issue 6, SPEC §7)."""

from __future__ import annotations

import shutil
import signal

from harness import Ambassador, freePort
from tlspeers import Certs, TLSEchoMember, exchange


def config(listen: int, member: int, trust: str) -> str:
    return f"""
[[route]]
name = "secure"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["tcp:127.0.0.1:{member}"]

[route.tls]
server_name = "localhost"
trust_roots = "{trust}"
"""


def test_sighup_rereads_rotated_trust_roots_and_a_broken_file_keeps_the_old_ones(tmp_path):
    first, second = Certs(tmp_path / "first"), Certs(tmp_path / "second")
    trust = tmp_path / "trust.pem"
    shutil.copy(first.path("ca.pem"), trust)
    listen, port = freePort(), freePort()
    member = TLSEchoMember(first.serverContext(), port=port)
    with Ambassador(tmp_path, config=config(listen, port, str(trust))) as amb:
        try:
            assert exchange(listen, b"one") == b"ONE"

            # The member rotates to a certificate of a new CA: the old trust roots refuse it.
            member.stop()
            member = TLSEchoMember(second.serverContext(), port=port)
            assert exchange(listen, b"two") == b""
            amb.waitForLog(r"tls-error")

            # Same path, new contents, SIGHUP: verified against the new CA, no restart.
            shutil.copy(second.path("ca.pem"), trust)
            amb.signal(signal.SIGHUP)
            amb.waitForLog(r"reload: done")
            assert exchange(listen, b"three") == b"THREE"

            # A broken new file is refused as a whole: the old (good) settings keep serving.
            trust.write_text("not a certificate\n")
            amb.signal(signal.SIGHUP)
            amb.waitForLog(r"reload: the configuration is refused")
            assert 'key "tls.trust_roots"' in amb.log()
            assert exchange(listen, b"four") == b"FOUR"
            assert amb.process.poll() is None
        finally:
            member.stop()
