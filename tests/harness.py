"""Run the real ``twistd ambassador`` process for end-to-end tests.

Everything here is bounded in time: a process that does not come up, or does not
stop, fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable


#: twistd run by this interpreter (a venv's twistd script may not be on PATH).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class Ambassador:
    """A ``twistd -n --pidfile= ambassador ...`` child process.

    @param config: TOML text written to ``tmp/ambassador.toml`` (optional).
    @param routes: ``--route`` specs.
    @param args: more plugin arguments (default: ``--admin none``).
    """

    def __init__(
        self, tmp: Path, config: str | None = None, routes: Iterable[str] = (),
        args: Iterable[str] = ("--admin", "none"), env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.tmp = Path(tmp)
        self.logPath = self.tmp / f"ambassador-{id(self)}.log"
        command = [*TWISTD, "-n", "--pidfile=", "ambassador"]
        self.configPath: Path | None = None
        if config is not None:
            self.configPath = self.tmp / "ambassador.toml"
            self.configPath.write_text(config)
            command += ["--config", str(self.configPath)]
        for spec in routes:
            command += ["--route", spec]
        command += list(args)
        self.command = command
        self._logFile = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._logFile, stderr=subprocess.STDOUT, cwd=self.tmp,
            env={**os.environ, **(env or {})},
        )
        if wait:
            self.waitUntilListening()

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    def waitForLog(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``pattern`` (a regex) matches ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches
            if self.process.poll() is not None and not matches:
                raise AssertionError(
                    f"ambassador exited {self.process.returncode} before logging {pattern!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {count}x {pattern!r} in the log after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def waitUntilListening(self, timeout: float = 15.0) -> None:
        """Wait until twistd has started every route (its startup log line)."""
        self.waitForLog(r"Main loop|reactor class", timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if self.process.poll() is not None:
                raise AssertionError(f"ambassador exited {self.process.returncode}:\n{text}")
            if "listening on" in text and ("starting up" in text):
                # every route logs one "listening on" line, in one batch at start
                time.sleep(0.05)
                return
            time.sleep(0.05)
        raise TimeoutError(f"ambassador did not start listening:\n{self.log()}")

    def accessLines(self) -> list[dict[str, str]]:
        """The text access-log lines, as dicts of their key=value fields."""
        lines = []
        for line in self.log().splitlines():
            if "[ambassador.access#info]" not in line:
                continue
            body = line.split("] ", 1)[1]
            route, upstream, rest = body.split(" ", 2)
            fields = dict(part.split("=", 1) for part in rest.split())
            fields.update(route=route, upstream=upstream)
            lines.append(fields)
        return lines

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._logFile.close()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._logFile.close()
        return self.process.returncode

    def __enter__(self) -> "Ambassador":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
