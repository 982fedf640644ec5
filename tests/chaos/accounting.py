"""Accounting helpers for the chaos suite: what a process holds, what the admin reports.

The chaos tests judge the ambassador from outside, as an operator would: its file
descriptors and memory from /proc, its counters from the admin ``/metrics`` page.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Self

#: ``name{label="value",...} 1.5`` (labels optional), the Prometheus text format.
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def fdCount(pid: int) -> int:
    """How many file descriptors ``pid`` holds open (len of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rssBytes(pid: int) -> int:
    """The resident set size of ``pid`` (VmRSS of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def parseMetrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text page, keyed by (name, frozenset of label pairs)."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = frozenset(
            (key, raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for key, raw in _LABEL.findall(labels or "")
        )
        samples[(name, pairs)] = float(value)
    return samples


def scrapeMetrics(adminPort: int, timeout: float = 5.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET the admin ``/metrics`` on 127.0.0.1:adminPort and parse it."""
    conn = http.client.HTTPConnection("127.0.0.1", adminPort, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise AssertionError(f"/metrics answered {response.status}: {body[:200]}")
    finally:
        conn.close()
    return parseMetrics(body)


def metricSum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of every ``name`` sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (n, pairs), value in samples.items() if n == name and wanted <= pairs)


def waitUntil(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something true; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def socketsByRemotePort(pid: int) -> dict[int, int]:
    """How many TCP sockets ``pid`` holds, per remote port (listeners count under 0).

    Matches the socket inodes of /proc/PID/fd with /proc/PID/net/tcp{,6}: the chaos
    tests use it to tell a route's pooled member connections (legitimately kept
    after the load) from leaked descriptors.
    """
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    counts: dict[int, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[9] in inodes:
                        port = int(fields[2].rsplit(":", 1)[1], 16)
                        counts[port] = counts.get(port, 0) + 1
        except FileNotFoundError:
            continue
    return counts


def fdsBesides(pid: int, remotePorts: set[int]) -> int:
    """``fdCount(pid)`` less the TCP sockets it holds to ``remotePorts`` (e.g. the
    members' ports, whose pooled connections a route keeps on purpose)."""
    byPort = socketsByRemotePort(pid)
    return fdCount(pid) - sum(n for port, n in byPort.items() if port in remotePorts)


def steadyFdCount(pid: int, timeout: float = 5.0, interval: float = 0.1) -> int:
    """``fdCount(pid)`` once it holds still (three equal reads ``interval`` apart): a
    baseline taken right after a request to the process (e.g. an admin scrape) would
    otherwise count the connection it is still closing."""
    deadline = time.monotonic() + timeout
    reads = [fdCount(pid)]
    while len(reads) < 3 or len(set(reads[-3:])) > 1:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the descriptors of {pid} did not settle within {timeout}s: {reads}")
        time.sleep(interval)
        reads.append(fdCount(pid))
    return reads[-1]


def assertTwistd(pid: int) -> int:
    """``pid`` itself, once checked to be the twistd (not a shell or wrapper around it):
    its descriptors and memory are the ones the leak checks judge."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"ambassador" in argv and any(b"twistd" in arg for arg in argv), argv
    return pid


class Monitor:
    """Watches the ambassador while the load runs: breaker states, the budget, RSS, fds.

    @param rig: anything with the twistd's ``pid`` and its ``adminPort``.
    """

    def __init__(self, rig: Any, route: str = "chaos", interval: float = 0.25) -> None:
        self.rig = rig
        self.route = route
        self.interval = interval
        self.maxBreaker: dict[str, float] = {}
        self.budgetViolations: list[dict[str, int]] = []
        self.maxRss = 0
        self.maxFds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 (a monitor never kills the test; it reports)
                self.errors.append(f"{type(e).__name__}: {e}")

    def sample(self) -> None:
        pid = self.rig.pid
        self.maxRss = max(self.maxRss, rssBytes(pid))
        self.maxFds = max(self.maxFds, fdCount(pid))
        metrics = scrapeMetrics(self.rig.adminPort)
        for (name, labels), value in metrics.items():
            if name == "ambassador_breaker_state" and ("route", self.route) in labels:
                upstream = dict(labels)["upstream"]
                self.maxBreaker[upstream] = max(self.maxBreaker.get(upstream, 0.0), value)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.rig.adminPort}/status?route={self.route}", timeout=5,
        ) as response:
            status = json.load(response)
        for route in status["routes"]:
            budget = route["budget"]
            if budget["retries"] > budget["allowed"]:
                self.budgetViolations.append(budget)
