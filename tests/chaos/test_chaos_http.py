"""Chaos scenarios for the http route: the real twistd, real HTTP members behind fault
proxies, and a seeded, bounded load of real clients (issue 9).

Each scenario misbehaves in one way (resets before the answer, resets mid-body,
blackholes that come and go, latency at the attempt timeout, trickling bodies,
accept-and-close), sends mixed GET/POST traffic for a few seconds, and then checks the
books (:func:`httpload.auditHttp`): every request got exactly one answer, the right
one, within the deadline, no POST applied twice, metrics that count what the clients
saw; and that the process is back to its file descriptors after its idle pools
empty, with memory in bounds, the breaker and the budget having done their part.
Every fault at once, with tcp and redis beside, is the soak's job (``make soak``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attr
from accounting import Monitor, fdCount, metricSum, rssBytes, scrapeMetrics, waitUntil
from chaos.faultproxy import FaultProxy
from harness import Ambassador, freePort
from httpload import HttpLoad, Outcome, auditHttp, summary
from httpmember import HttpMember

#: Load per scenario (each test stays well under 30 s: ~2 s start, this, ~5 s to settle).
LOAD_SECONDS = 3.5
#: Idle member connections (the pool) and idle app connections close after this.
IDLE = 1.5
#: How much the RSS may grow over a scenario.
RSS_GROWTH = 64 * 1024 * 1024


@attr.s(auto_attribs=True)
class Rig:
    ambassador: Ambassador
    member: HttpMember
    proxies: list[FaultProxy]
    appPort: int
    adminPort: int
    deadline: float
    idle: float = IDLE
    fdBaseline: int = 0
    rssBaseline: int = 0

    @property
    def pid(self) -> int:
        return self.ambassador.process.pid

    def upstream(self, index: int) -> str:
        return self.proxies[index].address


@contextmanager
def chaosRig(tmp_path: Path, members: int, seed: int, timeout: str = "1s", deadline: float = 3.0,
             retry: str = "", idle: float = IDLE) -> Iterator[Rig]:
    """One twistd with one http route ("chaos") over ``members`` fault proxies in front of
    one recording HTTP member."""
    with ExitStack() as stack:
        member = stack.enter_context(HttpMember(tmp_path / "member.log"))
        proxies = [
            stack.enter_context(FaultProxy(target=("127.0.0.1", member.port), seed=seed + i))
            for i in range(members)
        ]
        # the proxies listen before our ports are picked (they bind port 0: no race)
        upstreams = ", ".join(f'"{fp.address}"' for fp in proxies)
        appPort, adminPort = freePort(), freePort()
        config = f"""
[defaults]
connect_timeout = "500ms"
timeout = "{timeout}"
deadline = "{deadline}s"
idle_timeout = "{idle}s"

[defaults.retry]
attempts = 3
backoff_base = "20ms"
backoff_max = "200ms"
budget_ratio = 0.2
budget_min_per_second = 2
{retry}

[defaults.breaker]
failure_threshold = 5
reset_timeout = "1s"
half_open_max = 1

[[route]]
name = "chaos"
protocol = "http"
listen = "tcp:{appPort}"
upstreams = [{upstreams}]
"""
        ambassador = stack.enter_context(Ambassador(
            tmp_path, config=config, args=["--admin", f"tcp:{adminPort}:interface=127.0.0.1"]))
        rig = Rig(ambassador, member, proxies, appPort, adminPort, deadline, idle)
        scrapeMetrics(adminPort)  # the admin site is up (and its first connection closed)
        rig.fdBaseline = _settledFds(rig.pid)
        rig.rssBaseline = rssBytes(rig.pid)
        yield rig


def _settledFds(pid: int) -> int:
    """The fd count once it stops moving (an admin connection closing, say)."""
    previous = fdCount(pid)
    for _ in range(20):
        time.sleep(0.1)
        current = fdCount(pid)
        if current == previous:
            return current
        previous = current
    return previous


def runScenario(rig: Rig, seed: int, truncationAllowed: bool = False, seconds: float = LOAD_SECONDS,
                **load: Any) -> tuple[list[Outcome], Monitor, dict]:
    """Run the load, then check every rule that does not depend on the scenario."""
    with Monitor(rig) as monitor:
        outcomes = HttpLoad(rig.appPort, seconds, seed, **load).run()
    assert outcomes, "the load sent nothing"

    # Every answered request is counted once the exchange ends: wait for the count.
    answered = sum(o.kind != "unanswered" for o in outcomes)
    try:
        waitUntil(lambda: metricSum(scrapeMetrics(rig.adminPort), "ambassador_requests_total",
                                    route="chaos") >= answered, 5)
    except TimeoutError:
        pass  # auditHttp reports the difference
    metrics = scrapeMetrics(rig.adminPort)
    problems = auditHttp(outcomes, rig.member, metrics, "chaos", rig.deadline,
                         truncationAllowed=truncationAllowed)
    assert not monitor.errors, monitor.errors[:5]
    assert not monitor.budgetViolations, f"retries over the budget: {monitor.budgetViolations[:3]}"
    assert monitor.maxRss - rig.rssBaseline < RSS_GROWTH, (monitor.maxRss, rig.rssBaseline)
    assert not problems, "\n".join(problems[:30]) + f"\n{summary(outcomes)}"
    _checkFdsBack(rig)
    return outcomes, monitor, metrics


def _checkFdsBack(rig: Rig) -> None:
    """After the load, the only extra fds are pooled member connections; after the pool's
    idle timeout, none."""
    def pooledAccountedFor() -> bool:
        extra = fdCount(rig.pid) - rig.fdBaseline
        held = sum(fp.stats()["open"] for fp in rig.proxies)
        return extra == held and fdCount(rig.pid) - rig.fdBaseline == extra

    try:
        waitUntil(pooledAccountedFor, 3)
    except TimeoutError:
        raise AssertionError(
            f"fds {fdCount(rig.pid)} - baseline {rig.fdBaseline} is not the "
            f"{[fp.stats()['open'] for fp in rig.proxies]} member connections the proxies see"
        ) from None
    try:
        waitUntil(lambda: fdCount(rig.pid) == rig.fdBaseline, 2 * rig.idle + 3)
    except TimeoutError:
        raise AssertionError(
            f"fds {fdCount(rig.pid)} not back to {rig.fdBaseline} after the idle timeout; "
            f"proxies still see {[fp.stats()['open'] for fp in rig.proxies]} connections"
        ) from None


def bigPaths(rng: Any) -> str:
    return f"/blob?size={rng.randint(50_000, 300_000)}"


def attemptsOf(metrics: dict, upstream: str, result: str) -> float:
    return metricSum(metrics, "ambassador_attempts_total", route="chaos", upstream=upstream, result=result)


def test_resetsBeforeTheResponse(tmp_path: Path) -> None:
    seed = 101
    with chaosRig(tmp_path, 3, seed) as rig:
        rig.proxies[0].set("random", p=0.4, modes=["reset_before_response"], forward=True)
        rig.proxies[1].set("random", p=0.4, modes=["reset_before_response"])
        outcomes, _, metrics = runScenario(rig, seed, pipelineShare=0.2)
        faults = [fp.stats()["faults"].get("reset_before_response", 0) for fp in rig.proxies[:2]]
        assert all(faults), faults  # the faults happened
        assert attemptsOf(metrics, rig.upstream(0), "reset") > 0
        # a GET is retried past a reset (budget allowing): most GETs succeed
        gets = [o for o in outcomes if o.method == "GET"]
        assert sum(o.kind == "ok" for o in gets) > 0.8 * len(gets), summary(outcomes)


def test_resetsMidBodyOfLargeResponsesAndUploads(tmp_path: Path) -> None:
    seed = 202
    with chaosRig(tmp_path, 2, seed) as rig:
        # cut in the body of a big answer (the app already has the headers) ...
        rig.proxies[0].schedule([
            (1.0, "random", {"p": 0.5, "modes": ["reset_mid_response"], "after": 120_000}),
            (1.0, "random", {"p": 0.5, "modes": ["reset_mid_response"], "after": 30_000, "kill": True}),
        ])
        # ... and in the head (before the app has anything: retried for GET)
        rig.proxies[1].set("random", p=0.3, modes=["reset_mid_response"], after=100)
        # big uploads too, some over max_retry_body (1 MiB): cut, never sent twice
        outcomes, _, _ = runScenario(rig, seed, truncationAllowed=True, clients=6, pathFor=bigPaths,
                                     postBytes=(50_000, 1_500_000), pipelineShare=0.2)
        kinds = summary(outcomes)["kinds"]
        assert kinds.get("truncated", 0) > 0, kinds  # the scenario did cut bodies
        assert kinds.get("ok", 0) > kinds.get("truncated", 0), kinds


def test_blackholeAndFlappingMembers(tmp_path: Path) -> None:
    seed = 303
    with chaosRig(tmp_path, 3, seed, timeout="500ms", deadline=2.0) as rig:
        rig.proxies[0].schedule([(1.5, "pass", {}), (2.0, "blackhole", {"kill": True})])
        rig.proxies[1].schedule([
            (1.0, "pass", {}), (0.5, "accept_close", {"kill": True}),
            (1.0, "pass", {}), (0.7, "blackhole", {"kill": True}),
        ])
        # kill=True resets connections mid-answer too: a cut body is then the right outcome
        outcomes, monitor, metrics = runScenario(rig, seed, truncationAllowed=True, pipelineShare=0.2)
        assert rig.proxies[0].stats()["faults"].get("blackhole", 0) > 0
        # the blackholed member timed out, its breaker opened, then it came back
        assert attemptsOf(metrics, rig.upstream(0), "timeout") >= 5
        assert monitor.maxBreaker.get(rig.upstream(0)) == 2, monitor.maxBreaker
        assert monitor.maxBreaker.get(rig.upstream(2), 0) == 0, monitor.maxBreaker  # the good one never
        assert summary(outcomes)["kinds"].get("ok", 0) > 0.5 * len(outcomes), summary(outcomes)


def test_latencyNearTheAttemptTimeout(tmp_path: Path) -> None:
    seed = 404
    with chaosRig(tmp_path, 2, seed, timeout="600ms", deadline=2.0) as rig:
        # 2 x 260 ms fits in a 600 ms attempt, 2 x 320 ms does not
        rig.proxies[0].schedule([(1.0, "latency", {"ms": 260}), (1.0, "latency", {"ms": 320})])
        rig.proxies[1].set("latency", ms=100)
        outcomes, _, metrics = runScenario(rig, seed, clients=10)
        assert attemptsOf(metrics, rig.upstream(0), "timeout") > 0
        assert attemptsOf(metrics, rig.upstream(0), "ok") > 0
        # a POST that timed out was applied by the member but never sent again
        timedOutPosts = [o for o in outcomes if o.method == "POST" and o.reason == "timeout"]
        assert all(o.attempts == 1 for o in timedOutPosts), timedOutPosts[:3]


def test_answerSlowerThanTheIdleTimeoutStillComes(tmp_path: Path) -> None:
    """A request whose answer takes longer than idle_timeout (but fits in timeout) is
    answered: idle_timeout is for stalls, not for a request awaiting its answer.  (Found
    by this suite: the app's connection used to be reset after idle_timeout.)"""
    seed = 454
    with chaosRig(tmp_path, 1, seed, timeout="3s", deadline=4.0, idle=1.0) as rig:
        rig.proxies[0].set("latency", ms=700)  # 1.4 s to the headers, each way 700 ms
        outcomes, _, _ = runScenario(rig, seed, seconds=2.0, clients=4)
        assert summary(outcomes)["kinds"] == {"ok": len(outcomes)}, summary(outcomes)


def test_throttledBigBodies(tmp_path: Path) -> None:
    seed = 505
    with chaosRig(tmp_path, 2, seed, timeout="2s", deadline=4.0) as rig:
        rig.proxies[0].set("throttle", bytesPerSecond=400_000)
        rig.proxies[1].set("throttle", bytesPerSecond=200_000)
        outcomes, _, metrics = runScenario(rig, seed, clients=6, pathFor=bigPaths)
        kinds = summary(outcomes)["kinds"]
        assert kinds == {"ok": len(outcomes)}, kinds  # slow is not broken: every body intact
        down = metricSum(metrics, "ambassador_bytes_total", route="chaos", direction="downstream")
        assert down > 50_000 * len(outcomes)


def test_acceptAndClose(tmp_path: Path) -> None:
    seed = 606
    with chaosRig(tmp_path, 3, seed) as rig:
        rig.proxies[0].set("random", p=0.5, modes=["accept_close"])
        rig.proxies[1].schedule([(1.0, "pass", {}), (1.0, "accept_close", {"kill": True})])
        outcomes, _, metrics = runScenario(rig, seed, truncationAllowed=True,  # kill cuts answers
                                           pipelineShare=0.2)
        assert rig.proxies[0].stats()["faults"].get("accept_close", 0) > 0
        assert attemptsOf(metrics, rig.upstream(0), "reset") + attemptsOf(
            metrics, rig.upstream(0), "connect-failure") > 0
        gets = [o for o in outcomes if o.method == "GET"]
        assert sum(o.kind == "ok" for o in gets) > 0.8 * len(gets), summary(outcomes)


class _FakeMember:
    """What the audit asks of a member: how often each (method, id) was applied."""

    def __init__(self, applied: dict[tuple[str, str], int]) -> None:
        from collections import Counter

        self._applied = Counter(applied)

    def applied(self) -> Any:
        return self._applied


def test_theAuditCatchesWhatItIsFor() -> None:
    """The books checks fail on each thing they are meant to catch (no audit that passes
    everything)."""
    ok = Outcome("a", "GET", kind="ok", status=200, attempts=1, headerSeconds=0.1)
    post = Outcome("p", "POST", kind="error", status=502, reason="reset", attempts=1)
    clean = _FakeMember({("GET", "a"): 1, ("POST", "p"): 1})
    assert auditHttp([ok, post], clean, None, "chaos", deadline=3.0) == []  # type: ignore[arg-type]

    twice = _FakeMember({("GET", "a"): 1, ("POST", "p"): 2})
    assert any("applied 2 times" in p for p in auditHttp([ok, post], twice, None, "chaos", 3.0))  # type: ignore[arg-type]
    onlyA = _FakeMember({("GET", "a"): 1})
    slow = attr.evolve(ok, headerSeconds=6.0)
    assert any("deadline" in p for p in auditHttp([slow], onlyA, None, "chaos", 3.0))  # type: ignore[arg-type]
    lost = Outcome("a", "GET")
    assert any("unanswered" in p for p in auditHttp([lost], onlyA, None, "chaos", 3.0))  # type: ignore[arg-type]
    cut = attr.evolve(ok, kind="truncated")
    assert auditHttp([cut], onlyA, None, "chaos", 3.0)  # type: ignore[arg-type]
    assert not auditHttp([cut], onlyA, None, "chaos", 3.0, truncationAllowed=True)  # type: ignore[arg-type]
    metrics = {
        ("ambassador_requests_total", frozenset({("route", "chaos"), ("result", "ok")})): 2.0,
        ("ambassador_attempts_total", frozenset({("route", "chaos"), ("upstream", "u"), ("result", "ok")})): 1.0,
        ("ambassador_retries_total", frozenset({("route", "chaos")})): 0.0,
    }
    assert any("requests_total" in p for p in auditHttp([ok], onlyA, metrics, "chaos", 3.0))  # type: ignore[arg-type]


def test_reloadsUnderLoad(tmp_path: Path) -> None:
    """SIGHUP with a changed route (a member in and out, another timeout) five times
    under faulty load: no request is lost to a reload, no answer is wrong, nothing is
    applied twice, the metrics of the answered requests balance.

    A reload hands the route's listener to the new settings; the old settings' keep-alive
    app connections drain as HAProxy (``idle-close-on-response``) and Envoy do: an idle
    one waits (up to ``drain_timeout``) for the app's next request and answers it with
    ``connection: close``, and so does a busy one whose answer's head went out before the
    reload (see ``AppConnection.drain``).  A request sent on a reused connection as the
    reload happens therefore gets its answer: one that got none (a reset, the
    connection closed under it) fails this test, as would any other request lost (an
    app cannot re-send a POST blindly).
    """
    seed = 808
    with chaosRig(tmp_path, 3, seed) as rig:
        rig.proxies[0].set("random", p=0.3, modes=["reset_before_response", "reset_mid_response"],
                           after=50, forward=True)
        assert rig.ambassador.configPath is not None
        text = rig.ambassador.configPath.read_text()
        changed = text.replace(f'"{rig.proxies[0].address}", ', "").replace('timeout = "1s"', 'timeout = "900ms"')
        with Monitor(rig) as monitor:
            load = HttpLoad(rig.appPort, LOAD_SECONDS, seed, clients=8)
            load.start()
            reloads = []
            for turn in range(5):
                time.sleep(LOAD_SECONDS / 6)
                rig.ambassador.configPath.write_text(changed if turn % 2 == 0 else text)
                reloads.append(time.monotonic())
                rig.ambassador.signal(signal.SIGHUP)
            outcomes = load.join()
        rig.ambassador.waitForLog(r"reload: done", count=5)
        assert rig.ambassador.process.poll() is None
        assert not monitor.errors, monitor.errors[:5]

        lost = [o for o in outcomes
                if o.kind == "unanswered" and o.reused and o.sentAt >= reloads[0]]
        assert not lost, (f"{len(lost)} of {len(outcomes)} requests sent on reused keep-alive "
                          f"connections after the first reload got no answer: "
                          f"{[(o.requestId, o.method, o.detail) for o in lost[:10]]}")
        answered = sum(o.kind != "unanswered" for o in outcomes)
        try:
            waitUntil(lambda: metricSum(scrapeMetrics(rig.adminPort), "ambassador_requests_total",
                                        route="chaos") >= answered, 5)
        except TimeoutError:
            pass
        # a member left and came back: its attempt series restarted from zero
        problems = auditHttp(outcomes, rig.member, scrapeMetrics(rig.adminPort), "chaos", rig.deadline,
                             truncationAllowed=True, membersStayed=False)
        assert not problems, "\n".join(problems[:30]) + f"\n{summary(outcomes)}"
        assert summary(outcomes)["kinds"].get("ok", 0) > 0.8 * len(outcomes), summary(outcomes)
        _checkFdsBack(rig)
