"""The open-file limit raised at start-up (ambassador.filelimit), on a fake ``resource``."""

from __future__ import annotations

import resource
import sys

import attrs
import pytest

from ambassador import filelimit

INFINITY = -1


@attrs.define
class FakeLimits:
    """The three calls and two constants of ``resource`` that filelimit uses."""

    soft: int
    hard: int
    refuse: bool = False
    calls: list[tuple[int, int]] = attrs.field(factory=list)
    RLIMIT_NOFILE: int = 7
    RLIM_INFINITY: int = INFINITY

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.calls.append(limits)
        self.soft, self.hard = limits


@attrs.frozen
class R:
    maxConnections: int = 1024


@pytest.fixture(autouse=True)
def _noOriginal(monkeypatch):
    monkeypatch.setattr(filelimit, "original", None)


def test_two_descriptors_per_connection_plus_a_reserve():
    assert filelimit.needed([R(1000), R(24)]) == 2048 + filelimit.RESERVE


def test_the_soft_limit_is_raised_to_the_hard_one_and_remembered():
    limits = FakeLimits(soft=1024, hard=524288)
    assert filelimit.raiseLimit([R()], limits) == (1024, 524288)
    assert limits.calls == [(524288, 524288)]
    assert filelimit.original == 1024


def test_a_soft_limit_already_at_the_hard_one_is_left_alone():
    limits = FakeLimits(soft=20000, hard=20000)
    assert filelimit.raiseLimit([R()], limits) == (20000, 20000)
    assert limits.calls == []
    assert filelimit.original is None


def test_an_infinite_hard_limit_raises_only_to_what_the_routes_need():
    limits = FakeLimits(soft=256, hard=INFINITY)
    filelimit.raiseLimit([R(1000)], limits)
    assert limits.calls == [(2000 + filelimit.RESERVE, INFINITY)]


def test_an_infinite_soft_limit_is_never_lowered():
    limits = FakeLimits(soft=INFINITY, hard=INFINITY)
    assert filelimit.raiseLimit([R()], limits) == (INFINITY, INFINITY)
    assert limits.calls == []


def test_a_hard_limit_below_the_need_is_still_used_and_warned_about():
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits = FakeLimits(soft=1024, hard=1500)
        assert filelimit.raiseLimit([R(1024)], limits) == (1024, 1500)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") and e["log_level"].name == "warn"]
    assert [e["want"] for e in warnings] == [2048 + filelimit.RESERVE]


def test_a_refused_raise_keeps_the_limit_and_remembers_nothing():
    limits = FakeLimits(soft=1024, hard=4096, refuse=True)
    assert filelimit.raiseLimit([R(10)], limits) == (1024, 1024)
    assert filelimit.original is None


def test_a_child_gets_the_original_soft_limit_and_ours_comes_back():
    limits = FakeLimits(soft=1024, hard=8192)
    filelimit.raiseLimit([R()], limits)
    with filelimit.childLimit(limits):
        assert limits.getrlimit(limits.RLIMIT_NOFILE) == (1024, 8192)
    assert limits.getrlimit(limits.RLIMIT_NOFILE) == (8192, 8192)


def test_no_raise_no_change_for_a_child():
    limits = FakeLimits(soft=1024, hard=8192)
    with filelimit.childLimit(limits):
        pass
    assert limits.calls == []


def test_the_real_process_raises_its_limit_at_start_up(tmp_path):
    """End to end: a twistd started with a soft limit of 1024 runs with the hard one."""
    from harness import Ambassador, freePort

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        amb = Ambassador(tmp_path, routes=[f"tcp tcp:{freePort()} tcp:127.0.0.1:{freePort()}"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with amb:
        with open(f"/proc/{amb.process.pid}/limits") as f:
            text = f.read()
        line = next(l for l in text.splitlines() if l.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
        amb.waitForLog(rf"open-file limit raised from 1024 to {hard}")


def test_a_wrapped_command_gets_the_soft_limit_we_were_started_with(tmp_path):
    """Wrapper mode: CMD sees the soft limit of 1024 that the ambassador was given."""
    from harness import Ambassador, freePort

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    out = tmp_path / "child-limit"
    script = ("import resource,sys; open(sys.argv[1],'w').write("
              "'%d %d' % resource.getrlimit(resource.RLIMIT_NOFILE))")
    command = [sys.executable, "-c", script, str(out)]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        amb = Ambassador(
            tmp_path, routes=[f"tcp tcp:{freePort()} tcp:127.0.0.1:{freePort()}"],
            args=["--admin", "none", "--", *command], wait=False,
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert amb.wait(20) == 0, amb.log()
    finally:
        amb.stop()
    assert out.read_text() == f"1024 {hard}"
