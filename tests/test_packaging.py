"""``pip install .`` gives a working ``twistd ambassador`` and a clean wheel (SPEC §1,
TWISTED-NOTES "Plugin and packaging").

One fresh venv (no system site-packages, so the editable install of the machine's
Python cannot hide a broken one) serves both checks; pip's cache keeps the second
install short.  The checkout is copied first so build/ and egg-info stay out of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", ".benchmarks", "dropin.cache", "_trial_temp",
)

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a fresh venv, a copy of the checkout without .venv/.git/build products)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "checkout"
    shutil.copytree(CHECKOUT, source, ignore=IGNORED)
    run(sys.executable, "-m", "venv", base / "venv", cwd=base)
    return base / "venv", source


def twistdHelp(venv: Path, cwd: Path) -> str:
    return run(venv / "bin" / "twistd", "--help", cwd=cwd)


def test_pip_install_gives_the_twistd_plugin_and_a_clean_wheel(
    venv: tuple[Path, Path], tmp_path: Path
) -> None:
    env, source = venv
    run(env / "bin" / "pip", "install", "--quiet", source, cwd=tmp_path)
    where = run(env / "bin" / "python", "-c", "import ambassador; print(ambassador.__file__)",
                cwd=tmp_path)
    assert "site-packages" in where, where
    assert "ambassador" in twistdHelp(env, tmp_path).split()

    [record] = (env / "lib").glob("python3*/site-packages/ambassador-*.dist-info/RECORD")
    files = [line.split(",")[0] for line in record.read_text().splitlines() if line]
    assert "twisted/plugins/ambassador_plugin.py" in files
    assert "ambassador/tap.py" in files
    for path in files:
        top = path.split("/")[0]
        assert top in ("ambassador", "twisted") or top.endswith(".dist-info") or top == "..", path
        assert not path.startswith(("tests/", "conf/", "bench/", "demo/")), path
    assert "twisted/__init__.py" not in files
    assert "twisted/plugins/__init__.py" not in files


def test_editable_install_finds_the_plugin(venv: tuple[Path, Path], tmp_path: Path) -> None:
    env, source = venv
    run(env / "bin" / "pip", "install", "--quiet", "-e", source, cwd=tmp_path)
    where = run(env / "bin" / "python", "-c", "import ambassador; print(ambassador.__file__)",
                cwd=tmp_path)
    assert where.strip() == str(source / "ambassador" / "__init__.py")
    assert "ambassador" in twistdHelp(env, tmp_path).split()
