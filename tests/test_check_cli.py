"""``python -m ambassador check`` as ops run it: a child process, exit status and output
(SPEC §1).  Every shipped ``conf/*.toml`` must pass; every ``conf/bad/*.toml`` must be
refused with the errors its ``# expect: ROUTE KEY`` comments list.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ambassador.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = sorted((ROOT / "conf").glob("*.toml"))
BAD = sorted((ROOT / "conf" / "bad").glob("*.toml"))


def check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambassador", "check", *args],
        check=False, cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_there_are_example_configs():
    assert GOOD, "conf/*.toml: no example config to check"
    assert BAD, "conf/bad/*.toml: no bad example config to check"


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_every_shipped_config_passes_check(path):
    result = check("--config", str(path))
    assert result.returncode == 0, result.stderr
    with open(path, "rb") as f:
        routes = tomllib.load(f).get("route", [])
    summaries = [line for line in result.stdout.splitlines() if line.startswith("route ")]
    assert len(summaries) == len(routes), result.stdout
    for raw, line in zip(routes, summaries):
        if "name" in raw:
            assert line.startswith(f'route "{raw["name"]}": {raw["protocol"]} on ')


def _expectations(path: Path) -> list[tuple[str | None, str]]:
    """``# expect: ROUTE KEY`` lines; ROUTE ``-`` means a top-level key."""
    found = []
    for line in path.read_text().splitlines():
        match = re.match(r'#\s*expect:\s*(-|route\[\d+\]|route "[^"]+")\s+(\S+)\s*$', line)
        if match:
            where = None if match.group(1) == "-" else match.group(1)
            found.append((where, match.group(2)))
    return found


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_every_bad_example_is_refused_with_all_its_errors(path):
    expected = _expectations(path)
    assert expected, f"{path} lists no '# expect:' lines"
    result = check("--config", str(path))
    assert result.returncode == 1, result.stdout
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    for where, key in expected:
        assert any(
            e.startswith(f"{path}: ") and (where is None or f" {where}: " in e) and f'key "{key}"' in e
            for e in errors
        ), f"no error names {where} / {key}:\n{result.stderr}"
    assert len(errors) == len(expected), result.stderr


def test_a_bad_config_written_by_a_user_is_refused_naming_file_route_and_key(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[[route]]\nname = "pay"\nprotocol = "tcp"\nlisten = "tcp:18080"\n'
        'upstreams = ["tcp:127.0.0.1:9000"]\nconect_timeout = "1s"\n'
        '[route.retry]\nbackoff_max = -2\n'
    )
    result = check("--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith(f'{path}: route "pay": key "conect_timeout": ')
    assert errors[1].startswith(f'{path}: route "pay": key "retry.backoff_max": ')


# The rest run ``main()`` in this process: the same code path as the command, without
# paying a Python start-up per case.


def test_route_options_alone_pass_check(capsys):
    code = main(["check", "--route", "tcp tcp:18090 tcp:127.0.0.1:9100", "--route", "tcp tcp:18091 unix:/tmp/x"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith('route "tcp-1": tcp on tcp:18090:interface=127.0.0.1 -> tcp:127.0.0.1:9100 ')
    assert lines[1].startswith('route "tcp-2": tcp on tcp:18091:interface=127.0.0.1 -> unix:/tmp/x ')
    assert lines[2] == "admin: tcp:9901:interface=127.0.0.1"


def test_admin_none_turns_the_admin_endpoint_off(capsys):
    assert main(["check", "--route", "tcp tcp:18090 tcp:127.0.0.1:9100", "--admin", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "admin: off"


def test_bad_route_option_is_refused(capsys):
    assert main(["check", "--route", "tcp tcp:18090"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("--route: --route[1]: ")


def test_check_without_config_or_route_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code != 0
    assert "usage" in capsys.readouterr().err.lower()
