"""systemd socket activation (conf/systemd/): ``systemd:domain=INET:index=N`` listeners
adopt the sockets systemd hands over, serve, and keep them across a SIGHUP reload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from harness import TWISTD, freePort
from test_reload import SlowMember, exchange

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")

CONFIG = """
[[route]]
name = "a"
protocol = "tcp"
listen = "systemd:domain=INET:index=0"
upstreams = ["tcp:127.0.0.1:{member}"]
{extra}
[[route]]
name = "b"
protocol = "tcp"
listen = "systemd:domain=INET:index=1"
upstreams = ["tcp:127.0.0.1:{member}"]
"""


def waitFor(path, text: str, timeout: float = 10.0, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace")
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r} in:\n{path.read_text(errors='replace')}")


def test_socket_activated_routes_serve_and_keep_their_sockets_across_a_reload(tmp_path):
    member = SlowMember()
    a, b = freePort(), freePort()
    config = tmp_path / "ambassador.toml"
    config.write_text(CONFIG.format(member=member.port, extra=""))
    logPath = tmp_path / "ambassador.log"
    # Real systemd always sets LISTEN_FDNAMES; Twisted ignores the sockets without it.
    command = [ACTIVATE, "--fdname=a:b", "-l", f"127.0.0.1:{a}", "-l", f"127.0.0.1:{b}",
               *TWISTD, "-n", "--pidfile=", "ambassador", "--admin", "none", "--config", str(config)]
    with open(logPath, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        waitFor(logPath, f"127.0.0.1:{b} as 4")
        # systemd-socket-activate execs twistd on the first connection, which waits
        # in the backlog meanwhile, like under systemd.
        assert exchange(a, b"first") == b"FIRST"
        waitFor(logPath, "listening on systemd:domain=INET:index=1")
        assert exchange(b, b"second") == b"SECOND"
        config.write_text(CONFIG.format(member=member.port, extra='idle_timeout = "1m"'))
        process.send_signal(signal.SIGHUP)
        assert "changed: a" in waitFor(logPath, "reload: done")
        assert exchange(a, b"after") == b"AFTER"
        assert exchange(b, b"other") == b"OTHER"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        member.close()
