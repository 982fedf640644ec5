"""The ``twistd ambassador`` command line (SPEC §1, §2 bad configuration, §7 SIGTERM)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

from harness import TWISTD, Ambassador, freePort
from peers import echoServer


def twistd(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout,
    )


def test_help_lists_every_option(tmp_path: Path) -> None:
    done = twistd("ambassador", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for option in (r"-c, --config=", r"-r, --route=", r"--admin=", r"--log-format=", r"-- CMD"):
        assert option in done.stdout, f"{option!r} missing from:\n{done.stdout}"


def test_neither_config_nor_route_is_a_usage_error(tmp_path: Path) -> None:
    done = twistd("-n", "--pidfile=", "ambassador", cwd=tmp_path)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Usage:" in output
    assert "--config" in output and "--route" in output


def test_bad_config_exits_before_binding_naming_file_route_and_key(tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))  # had it tried to bind, it would say so
    port = busy.getsockname()[1]
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[[route]]\nname = "good"\nprotocol = "tcp"\nlisten = "tcp:{port}"\n'
        f'upstreams = ["tcp:127.0.0.1:1"]\n'
        f'[[route]]\nname = "typo"\nprotocol = "tcp"\nlisten = "tcp:{freePort()}"\n'
        f'upstreams = ["tcp:127.0.0.1:1"]\nconect_timeout = "1s"\n'
        f'[[route]]\nname = "nobody"\nprotocol = "gopher"\nlisten = "tcp:{freePort()}"\n'
        f'upstreams = ["tcp:127.0.0.1:1"]\n'
    )
    try:
        done = twistd("-n", "--pidfile=", "ambassador", "--admin", "none", "--config", str(config),
                      cwd=tmp_path)
    finally:
        busy.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert re.search(rf'{re.escape(str(config))}.*route "typo".*conect_timeout', output), output
    assert re.search(rf'{re.escape(str(config))}.*route "nobody".*protocol.*gopher', output), output
    assert "listening on" not in output
    assert "cannot listen" not in output


def test_port_in_use_exits_naming_the_route_and_endpoint(tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        done = twistd(
            "-n", "--pidfile=", "ambassador", "--admin", "none",
            "--route", f"tcp tcp:{port} tcp:127.0.0.1:1", cwd=tmp_path,
        )
    finally:
        busy.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert re.search(rf'route "tcp-1".*tcp:{port}.*(in use|Address already)', output), output


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    listen = freePort()
    with echoServer() as echo:
        amb = Ambassador(tmp_path, routes=[f"tcp tcp:{listen} {echo.address}"])
        try:
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as c:
                c.sendall(b"alive")
                assert c.recv(100) == b"alive"
        finally:
            amb.signal(signal.SIGTERM)
            status = amb.wait(20)
        assert status == 0, amb.log()
