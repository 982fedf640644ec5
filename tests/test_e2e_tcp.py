"""The tcp route seen from outside (SPEC §2 loopback default, §3, §4/tcp): the real
``twistd ambassador`` between real sockets.

Bounds like "closed within deadline + SLACK" are contract checks, not timings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from harness import Ambassador, freePort
from peers import (
    Blackhole,
    closingServer,
    echoServer,
    greetThenListenServer,
    refusingAddress,
    replyAtEndServer,
    sinkServer,
)

#: Allowance for process scheduling on a loaded CI machine.
SLACK = 3.0
MiB = 1024 * 1024


def tcpConfig(listen: str, upstreams: list[str], name: str = "pair", settings: str = "",
              tables: str = "") -> str:
    """One tcp route; ``settings`` are route keys, ``tables`` route sub-tables."""
    members = ", ".join(f'"{u}"' for u in upstreams)
    return (
        f'[[route]]\nname = "{name}"\nprotocol = "tcp"\nlisten = "{listen}"\n'
        f"upstreams = [{members}]\n{settings}\n{tables}\n"
    )


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def echoOnce(port: int, payload: bytes = b"ping", host: str = "127.0.0.1") -> bytes:
    with connect(port, host) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        return readAll(c)


def readAll(c: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = c.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def waitClosed(c: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes ``c`` (EOF or reset), failing after ``timeout``."""
    started = time.monotonic()
    c.settimeout(timeout)
    try:
        while c.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"the ambassador did not close the connection within {timeout}s")
    return time.monotonic() - started


def accessLines(amb: Ambassador, route: str, count: int, timeout: float = 10.0) -> list[dict[str, str]]:
    amb.waitForLog(rf"access#info\] {route} ", timeout=timeout, count=count)
    return [line for line in amb.accessLines() if line["route"] == route]


# --- bytes both ways -------------------------------------------------------------------


def test_echo_fifty_megabytes_each_way_at_the_same_time(tmp_path: Path) -> None:
    listen = freePort()
    payload = os.urandom(50 * MiB)
    with echoServer() as echo, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [echo.address])
    ) as amb:
        with connect(listen, timeout=60) as c:
            sendErrors: list[OSError] = []

            def send() -> None:
                try:
                    view = memoryview(payload)
                    for offset in range(0, len(payload), MiB):
                        c.sendall(view[offset:offset + MiB])
                    c.shutdown(socket.SHUT_WR)
                except OSError as e:  # reported by the main thread
                    sendErrors.append(e)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            digest = hashlib.sha256()
            received = 0
            while True:
                data = c.recv(256 * 1024)
                if not data:
                    break
                digest.update(data)
                received += len(data)
            sender.join(60)
            assert not sendErrors
        assert received == len(payload)
        assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
        [line] = accessLines(amb, "pair", 1)
        assert line["result"] == "ok"
        assert line["bytes_in"] == line["bytes_out"] == str(len(payload))


def test_app_half_close_still_gets_the_members_full_answer(tmp_path: Path) -> None:
    listen = freePort()
    request = b"please answer after my EOF\n" * 1000
    with replyAtEndServer() as member, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [member.address])
    ):
        with connect(listen) as c:
            c.sendall(request)
            c.shutdown(socket.SHUT_WR)  # the member answers only once it sees this EOF
            answer = readAll(c)
        assert member.received == [request]
        assert answer == request.upper() + b"\nsha256=" + hashlib.sha256(request).hexdigest().encode()


def test_member_half_close_first_and_the_app_still_sends(tmp_path: Path) -> None:
    listen = freePort()
    with greetThenListenServer() as member, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [member.address])
    ):
        with connect(listen) as c:
            assert readAll(c) == b"greetings, then EOF from the member"
            c.sendall(b"the app still talks after the member's EOF")
            c.shutdown(socket.SHUT_WR)
            assert readAll(c) == b""
        deadline = time.monotonic() + 10
        while not member.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert member.received == [b"the app still talks after the member's EOF"]


# --- members failing -------------------------------------------------------------------


def test_refusing_first_member_then_second_member_serves(tmp_path: Path) -> None:
    listen, dead = freePort(), refusingAddress()
    with echoServer() as echo, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [dead, echo.address])
    ) as amb:
        assert echoOnce(listen, b"retried") == b"retried"
        [line] = accessLines(amb, "pair", 1)
        assert (line["upstream"], line["attempts"], line["result"]) == (echo.address, "2", "ok")


def test_breaker_opens_after_failure_threshold_and_skips_the_dead_member(tmp_path: Path) -> None:
    listen, dead = freePort(), refusingAddress()
    breaker = '[route.breaker]\nfailure_threshold = 2\nreset_timeout = "10m"\n'
    with echoServer() as echo, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [dead, echo.address], tables=breaker)
    ) as amb:
        opened = f"breaker of {dead} is open"
        for n in range(1, 7):
            assert echoOnce(listen, b"x%d" % n) == b"x%d" % n
            accessLines(amb, "pair", n)
            if opened in amb.log():
                break
        assert opened in amb.log(), amb.log()
        before = len(accessLines(amb, "pair", n))
        assert sum(line["attempts"] == "2" for line in amb.accessLines()) == 2  # the threshold
        for m in range(4):
            assert echoOnce(listen, b"y%d" % m) == b"y%d" % m
        later = accessLines(amb, "pair", before + 4)[before:]
        assert [(line["upstream"], line["attempts"]) for line in later] == [(echo.address, "1")] * 4


def test_all_members_hanging_closes_the_app_within_the_deadline(tmp_path: Path) -> None:
    listen = freePort()
    with Blackhole() as one, Blackhole() as two, Ambassador(
        tmp_path,
        config=tcpConfig(f"tcp:{listen}", [one.address, two.address],
                         settings='connect_timeout = "30s"\ndeadline = "1s"\n'),
    ) as amb:
        with connect(listen) as c:
            took = waitClosed(c, timeout=1 + SLACK + 5)
        assert took <= 1 + SLACK
        [line] = accessLines(amb, "pair", 1)
        assert line["result"] == "deadline"


def test_all_members_refusing_closes_the_app(tmp_path: Path) -> None:
    listen = freePort()
    with Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [refusingAddress(), refusingAddress()],
                                   settings='deadline = "3s"\n'),
    ) as amb:
        with connect(listen) as c:
            took = waitClosed(c, timeout=3 + SLACK + 5)
        assert took <= 3 + SLACK
        [line] = accessLines(amb, "pair", 1)
        assert (line["result"], line["attempts"]) == ("connect-failure", "3")


def test_member_closing_at_once_closes_the_app(tmp_path: Path) -> None:
    listen = freePort()
    with closingServer() as member, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [member.address])
    ) as amb:
        with connect(listen) as c:
            # The member's EOF reaches the app at once.  The ambassador cannot tell a
            # member's close() from its shutdown(SHUT_WR), so (like HAProxy) it keeps the
            # app's write side open until the app closes too or idle_timeout.
            assert waitClosed(c, timeout=SLACK + 5) <= SLACK
        [line] = accessLines(amb, "pair", 1)
        assert (line["upstream"], line["result"], line["bytes_out"]) == (member.address, "ok", "0")


# --- limits ----------------------------------------------------------------------------


def test_idle_timeout_closes_an_idle_pair_and_a_silent_client(tmp_path: Path) -> None:
    listen = freePort()
    with echoServer() as echo, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [echo.address], settings='idle_timeout = "1s"\n')
    ) as amb:
        with connect(listen) as used, connect(listen) as silent:
            used.sendall(b"once")
            assert used.recv(100) == b"once"
            assert waitClosed(used, timeout=1 + SLACK + 5) <= 1 + SLACK
            assert waitClosed(silent, timeout=1 + SLACK + 5) <= 1 + SLACK
        lines = accessLines(amb, "pair", 2)
        assert sorted(line["bytes_in"] for line in lines) == ["0", "4"]


def test_max_connections_closes_the_extra_connection_until_one_leaves(tmp_path: Path) -> None:
    listen = freePort()
    with echoServer() as echo, Ambassador(
        tmp_path, config=tcpConfig(f"tcp:{listen}", [echo.address], settings="max_connections = 2\n")
    ):
        held = [connect(listen), connect(listen)]
        try:
            for n, c in enumerate(held):
                c.sendall(b"held%d" % n)
                assert c.recv(100) == b"held%d" % n
            try:
                with connect(listen) as extra:
                    assert waitClosed(extra, timeout=SLACK + 3) <= SLACK
            except ConnectionResetError:
                pass  # reset so early that connect() itself saw it (non-blocking connect)
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:  # the slot frees once the ambassador has seen the close
                try:
                    if echoOnce(listen, b"again") == b"again":
                        break
                except (ConnectionResetError, BrokenPipeError):
                    pass
                assert time.monotonic() < deadline, "the freed slot was never reused"
                time.sleep(0.1)
            held[0].sendall(b"still")
            assert held[0].recv(100) == b"still"
        finally:
            for c in held:
                c.close()


def vmRSS(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_member_that_never_reads_pushes_back_and_memory_stays_bounded(tmp_path: Path) -> None:
    listen = freePort()
    chunk = os.urandom(MiB)
    with sinkServer() as sink, Ambassador(
        # drain_timeout: the stuck pair is still open when the test stops the ambassador
        tmp_path, config=tcpConfig(f"tcp:{listen}", [sink.address], settings='drain_timeout = "1s"\n')
    ) as amb:
        with connect(listen) as warm:
            warm.sendall(b"warm-up")  # a first, short connection warms the relay's code paths
        time.sleep(0.3)
        before = vmRSS(amb.process.pid)
        sent = 0
        blocked = False
        with connect(listen) as c:
            c.settimeout(2.0)
            while sent < 200 * MiB:
                try:
                    sent += c.send(chunk)
                except TimeoutError:
                    blocked = True  # back-pressure reached the app
                    break
            after = vmRSS(amb.process.pid)
        assert blocked, f"all {sent} bytes were accepted: nothing pushed back"
        assert sent < 64 * MiB
        assert after - before < 32 * MiB, (before, after, sent)


# --- listen endpoints are loopback unless told otherwise (SPEC §2) ---------------------


def twoListenersConfig(loopbackPort: int, everywherePort: int, member: str) -> str:
    return tcpConfig(f"tcp:{loopbackPort}", [member], name="default") + tcpConfig(
        f"tcp:{everywherePort}:interface=0.0.0.0", [member], name="everywhere"
    )


def test_listener_without_interface_refuses_other_addresses(tmp_path: Path) -> None:
    loopback, everywhere = freePort(), freePort()
    with echoServer() as echo, Ambassador(
        tmp_path, config=twoListenersConfig(loopback, everywhere, echo.address)
    ) as amb:
        amb.waitForLog("listening on", count=2)
        assert echoOnce(loopback, b"a") == b"a"
        assert echoOnce(everywhere, b"b", host="127.0.0.2") == b"b"  # the control
        with pytest.raises(ConnectionRefusedError):
            connect(loopback, host="127.0.0.2", timeout=3).close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


NETNS_CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.sendall(b"from-ns"); c.shutdown(socket.SHUT_WR); print(c.recv(100).decode() or "EOF")
except OSError as e:
    print(type(e).__name__)
"""


def test_listener_without_interface_is_unreachable_from_another_host(tmp_path: Path) -> None:
    """A network namespace stands in for another machine on a TEST-NET-2 link."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, hostSide, nsSide = f"amb-{tag}", f"ambh{tag}", f"ambn{tag}"
    try:
        try:
            _ip("netns", "add", ns)
        except (subprocess.CalledProcessError, OSError) as e:
            pytest.skip(f"ip netns add failed: {getattr(e, 'stderr', e)!r}")
        _ip("link", "add", hostSide, "type", "veth", "peer", "name", nsSide)
        _ip("link", "set", nsSide, "netns", ns)
        _ip("addr", "add", "198.51.100.1/24", "dev", hostSide)
        _ip("link", "set", hostSide, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", "198.51.100.2/24", "dev", nsSide)
        _ip("netns", "exec", ns, "ip", "link", "set", nsSide, "up")

        loopback, everywhere = freePort(), freePort()
        with echoServer() as echo, Ambassador(
            tmp_path, config=twoListenersConfig(loopback, everywhere, echo.address)
        ) as amb:
            amb.waitForLog("listening on", count=2)

            def fromNamespace(port: int) -> str:
                done = subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_CONNECT,
                     "198.51.100.1", str(port)],
                    check=False, capture_output=True, text=True, timeout=20,
                )
                return done.stdout.strip() or done.stderr.strip()

            assert fromNamespace(everywhere) == "from-ns"  # the control: the link works
            assert fromNamespace(loopback) == "ConnectionRefusedError"
    finally:
        subprocess.run(["ip", "link", "del", hostSide], check=False, capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)
