"""The wrapper's decisions on a fake reactor: when CMD starts, with what, and how the
process leaves."""

from __future__ import annotations

import signal
import sys

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from ambassador.wrapper import LISTEN_WAIT, NOT_STARTED, Wrapper


class FakePort:
    def __init__(self, address):
        self.address = address

    def getHost(self):
        return self.address


class FakeRoute:
    def __init__(self, address=None, drainTimeout=10.0):
        self.port = FakePort(address) if address is not None else None
        self.route = type("Route", (), {"drainTimeout": drainTimeout})()


class FakeAmbassador:
    def __init__(self, routes):
        self.routes = routes


class FakeProcess:
    pid = 4242

    def __init__(self):
        self.signals = []
        self.gone = False

    def signalProcess(self, number):
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(number)


class SpawningReactor(MemoryReactorClock):
    def __init__(self, fail=None):
        super().__init__()
        self.spawned = []
        self.fail = fail
        self.stopped = 0

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kw):
        if self.fail is not None:
            raise self.fail
        process = FakeProcess()
        self.spawned.append((protocol, executable, args, env, childFDs, process))
        return process

    def stop(self):
        self.stopped += 1


def started(routes, command=(sys.executable, "-c", "pass"), **kwargs):
    reactor = SpawningReactor(**kwargs)
    exits = []
    wrapper = Wrapper(FakeAmbassador(routes), list(command), reactor,
                      environ={"PATH": "/usr/bin:/bin", "HOME": "/h", "LISTEN_FDS": "2",
                               "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"},
                      exit=exits.append, installSignals=False)
    wrapper.startService()
    for hook in reactor.whenRunningHooks:
        hook[0](*hook[1], **hook[2])
    return wrapper, reactor, exits


def shutdown(reactor):
    for phase in ("before", "during", "after"):
        for callable, args, kwargs in reactor.triggers.get(phase, {}).get("shutdown", []):
            callable(*args, **kwargs)


def test_the_command_gets_the_route_addresses_the_std_streams_and_no_systemd_variables():
    routes = {"api-v2.eu": FakeRoute(IPv4Address("TCP", "0.0.0.0", 8080)),
              "cache": FakeRoute(UNIXAddress(b"/run/cache.sock"))}
    _wrapper, reactor, _exits = started(routes)
    [(_, executable, args, env, childFDs, _)] = reactor.spawned
    assert executable == sys.executable and args == [sys.executable, "-c", "pass"]
    assert env["AMBASSADOR_API_V2_EU_ADDR"] == "127.0.0.1:8080"
    assert env["AMBASSADOR_CACHE_ADDR"] == "/run/cache.sock"
    assert env["HOME"] == "/h" and not any(k.startswith("LISTEN_") for k in env)
    assert childFDs == {0: 0, 1: 1, 2: 2}


def test_the_command_waits_until_every_route_listens():
    late = FakeRoute()
    _wrapper, reactor, _exits = started({"a": FakeRoute(IPv4Address("TCP", "127.0.0.1", 1)), "b": late})
    assert reactor.spawned == []
    late.port = FakePort(IPv4Address("TCP", "127.0.0.1", 2))
    reactor.advance(0.1)
    assert len(reactor.spawned) == 1


def test_routes_that_never_listen_end_the_process_without_starting_the_command():
    wrapper, reactor, _exits = started({"b": FakeRoute()})
    for _ in range(int(LISTEN_WAIT / 0.05) + 10):
        reactor.advance(0.05)
    assert reactor.spawned == [] and wrapper.status == 1 and reactor.stopped == 1


def test_a_command_not_found_exits_127_after_the_shutdown():
    wrapper, reactor, exits = started({"a": FakeRoute(IPv4Address("TCP", "127.0.0.1", 1))},
                                      command=["surely-not-a-command-here"])
    assert reactor.spawned == [] and wrapper.status == NOT_STARTED and reactor.stopped == 1
    assert exits == []
    shutdown(reactor)
    assert exits == [NOT_STARTED]


def test_a_command_the_system_cannot_start_exits_127():
    wrapper, _reactor, _exits = started({"a": FakeRoute(IPv4Address("TCP", "127.0.0.1", 1))},
                                      fail=OSError(8, "Exec format error"))
    assert wrapper.status == NOT_STARTED


def test_signals_are_passed_on_and_the_status_is_the_commands():
    wrapper, reactor, exits = started({"a": FakeRoute(IPv4Address("TCP", "127.0.0.1", 1))})
    [(protocol, *_, process)] = reactor.spawned
    wrapper.forward(signal.SIGTERM)
    wrapper.forward(signal.SIGINT)
    assert process.signals == [signal.SIGTERM, signal.SIGINT] and reactor.stopped == 0
    protocol.processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert reactor.stopped == 1
    shutdown(reactor)
    assert exits == [3]


def test_a_signal_before_the_command_started_ends_the_process_with_128_plus_it():
    wrapper, reactor, exits = started({"b": FakeRoute()})
    wrapper.forward(signal.SIGTERM)
    shutdown(reactor)
    assert exits == [128 + signal.SIGTERM] and reactor.spawned == []


def test_a_stop_from_elsewhere_stops_the_command_and_waits_for_it():
    wrapper, reactor, _exits = started({"a": FakeRoute(IPv4Address("TCP", "127.0.0.1", 1), 2.0)})
    [(protocol, *_, process)] = reactor.spawned
    stopped = wrapper.stopService()
    assert process.signals == ["TERM"] and not stopped.called
    reactor.advance(2.0)
    assert process.signals == ["TERM", "KILL"]
    protocol.processEnded(Failure(ProcessDone(0)))
    assert stopped.called
