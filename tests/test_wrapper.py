"""Wrapper mode (SPEC §8): ``twistd ambassador ... -- CMD``, from outside and in units."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import pytest
from harness import Ambassador, freePort
from test_reload import SlowMember
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from ambassador.wrapper import addressVariable, exitStatus, listeningAddress


def wrapped(tmp_path, routes, command, **kwargs) -> Ambassador:
    return Ambassador(tmp_path, routes=routes, args=["--admin", "none", "--", *command], **kwargs)


# --- from outside ----------------------------------------------------------------------


def test_the_command_sees_the_route_addresses_reaches_a_member_and_its_status_is_ours(tmp_path):
    member = SlowMember()
    listen, wide = freePort(), freePort()
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import os, socket, sys
        host, port = os.environ["AMBASSADOR_TCP_1_ADDR"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(b"through")
            answer = c.recv(100)
        print("APP", os.environ["AMBASSADOR_TCP_1_ADDR"], os.environ["AMBASSADOR_TCP_2_ADDR"],
              answer.decode(), flush=True)
        print("APP-ERR", file=sys.stderr, flush=True)
        sys.exit(3)
    """))
    try:
        amb = wrapped(tmp_path, [f"tcp tcp:{listen} tcp:127.0.0.1:{member.port}",
                                 f"tcp tcp:{wide}:interface=0.0.0.0 tcp:127.0.0.1:{member.port}"],
                      [sys.executable, str(script)], wait=False)
        assert amb.wait(20) == 3
        log = amb.log()
        assert f"APP 127.0.0.1:{listen} 127.0.0.1:{wide} THROUGH" in log
        assert "APP-ERR" in log
        assert "attempts=1 result=ok" in log, "the app's connection did not go through the route"
    finally:
        member.close()


def test_a_command_that_cannot_be_started_exits_127_with_a_message(tmp_path):
    amb = wrapped(tmp_path, [f"tcp tcp:{freePort()} tcp:127.0.0.1:{freePort()}"],
                  ["no-such-command-anywhere", "--flag"], wait=False)
    assert amb.wait(20) == 127
    assert "cannot start the command: no-such-command-anywhere: not found" in amb.log()


def test_sigterm_reaches_the_command_and_its_status_is_passed_on(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import signal, sys, time
        def term(number, frame):
            print("APP got", signal.Signals(number).name, flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, term)
        print("APP ready", flush=True)
        for _ in range(300):
            time.sleep(0.1)
        sys.exit(1)
    """))
    amb = wrapped(tmp_path, [f"tcp tcp:{freePort()} tcp:127.0.0.1:{freePort()}"],
                  [sys.executable, str(script)])
    try:
        amb.waitForLog("APP ready")
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 7
        assert "APP got SIGTERM" in amb.log()
    finally:
        amb.stop()


def test_a_command_ended_by_a_signal_gives_128_plus_the_signal(tmp_path):
    amb = wrapped(tmp_path, [f"tcp tcp:{freePort()} tcp:127.0.0.1:{freePort()}"],
                  [sys.executable, "-c", "import time; print('APP', 'up', flush=True); time.sleep(30)"])
    try:
        amb.waitForLog("APP up")  # not "APP ready": the log's command line would match
        amb.signal(signal.SIGINT)
        assert amb.wait(20) == 128 + signal.SIGINT
    finally:
        amb.stop()


def test_sighup_reloads_and_is_not_passed_on_to_the_command(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGHUP, lambda n, f: print("APP got SIGHUP", flush=True))
        print("APP ready", flush=True)
        for _ in range(300):
            time.sleep(0.1)
    """))
    config = tmp_path / "ambassador.toml"
    config.write_text(f'[[route]]\nprotocol = "tcp"\nlisten = "tcp:{freePort()}"\n'
                      f'upstreams = ["tcp:127.0.0.1:{freePort()}"]\n')
    amb = Ambassador(tmp_path, args=["--config", str(config), "--admin", "none", "--",
                                     sys.executable, str(script)])
    try:
        amb.waitForLog("APP ready")
        amb.signal(signal.SIGHUP)
        amb.waitForLog("reload: done")
        time.sleep(0.3)
        assert "APP got SIGHUP" not in amb.log()
        amb.signal(signal.SIGTERM)
        assert amb.wait(20) == 128 + signal.SIGTERM
    finally:
        amb.stop()


# --- units -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, variable", [
    ("payments", "AMBASSADOR_PAYMENTS_ADDR"),
    ("cache-v2.eu", "AMBASSADOR_CACHE_V2_EU_ADDR"),
    ("tcp-1", "AMBASSADOR_TCP_1_ADDR"),
])
def test_the_variable_name_is_the_route_name_upper_cased_with_underscores(name, variable):
    assert addressVariable(name) == variable


@pytest.mark.parametrize("address, value", [
    (IPv4Address("TCP", "127.0.0.1", 8080), "127.0.0.1:8080"),
    (IPv4Address("TCP", "0.0.0.0", 8080), "127.0.0.1:8080"),
    (IPv4Address("TCP", "10.1.2.3", 80), "10.1.2.3:80"),
    (IPv6Address("TCP", "::", 8080), "[::1]:8080"),
    (IPv6Address("TCP", "::1", 8080), "[::1]:8080"),
    (UNIXAddress(b"/run/ambassador/cache.sock"), "/run/ambassador/cache.sock"),
])
def test_the_address_is_what_an_app_connects_to(address, value):
    assert listeningAddress(address) == value


def test_the_exit_status_is_the_code_or_128_plus_the_signal():
    assert exitStatus(Failure(ProcessDone(0))) == 0
    assert exitStatus(Failure(ProcessTerminated(exitCode=3))) == 3
    assert exitStatus(Failure(ProcessTerminated(signal=15))) == 143
