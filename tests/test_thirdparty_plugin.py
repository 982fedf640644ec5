"""A route protocol installed by another package works with no change here (SPEC §9).

``tests/thirdparty/`` is that package (also the README's example): it is installed with
pip into a directory of its own, which the ambassador only sees through PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Ambassador, freePort
from peers import echoServer, refusingAddress

THIRDPARTY = Path(__file__).parent / "thirdparty"


@pytest.fixture(scope="module")
def pluginSite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --target SITE`` of a copy of tests/thirdparty (so that
    build/ and egg-info never land in the source tree)."""
    base = tmp_path_factory.mktemp("thirdparty")
    source = base / "src"
    shutil.copytree(THIRDPARTY, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "dropin.cache"))
    site = base / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
         str(source)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "twisted" / "plugins" / "ambassador_upper.py").exists()
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    return site


def withPath(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def upperConfig(listen: int, upstreams: list[str]) -> str:
    members = ", ".join(f'"{u}"' for u in upstreams)
    return (
        f'[[route]]\nname = "shout"\nprotocol = "upper"\nlisten = "tcp:{listen}"\n'
        f"upstreams = [{members}]\n"
    )


def check(config: Path, site: Path | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambassador", "check", "--config", str(config)],
        check=False, capture_output=True, text=True, timeout=60, env=withPath(site), cwd=config.parent,
    )


def test_check_accepts_the_plugins_protocol_when_it_is_installed(
    tmp_path: Path, pluginSite: Path
) -> None:
    config = tmp_path / "shout.toml"
    config.write_text(upperConfig(freePort(), ["tcp:127.0.0.1:7001"]))
    done = check(config, pluginSite)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'route "shout": upper on' in done.stdout


def test_check_refuses_the_protocol_without_the_plugin(tmp_path: Path) -> None:
    config = tmp_path / "shout.toml"
    config.write_text(upperConfig(freePort(), ["tcp:127.0.0.1:7001"]))
    done = check(config, None)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'route "shout"' in done.stderr and "upper" in done.stderr


def test_the_plugin_serves_traffic_through_the_routes_members(
    tmp_path: Path, pluginSite: Path
) -> None:
    listen, dead = freePort(), refusingAddress()
    with echoServer() as echo, Ambassador(
        tmp_path, config=upperConfig(listen, [dead, echo.address]), env=withPath(pluginSite)
    ) as amb:
        import socket

        with socket.create_connection(("127.0.0.1", listen), timeout=10) as c:
            c.sendall(b"hello, plugin\n")
            assert c.recv(100) == b"HELLO, PLUGIN\n"
        amb.waitForLog(r"access#info\] shout ")
        [line] = amb.accessLines()
        # the core's connect retry took it past the refusing first member
        assert (line["upstream"], line["attempts"], line["result"]) == (echo.address, "2", "ok")
