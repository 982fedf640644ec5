"""A fault-injecting TCP proxy for the chaos tests: put it between the ambassador and a member.

The ambassador exists to survive members that reset, stall, trickle or vanish.  Real
members rarely misbehave on cue, so the chaos tests point a route's member at one of
these proxies and tell it, at any moment, how to misbehave::

    with FaultProxy(target=("127.0.0.1", memberPort), seed=7) as fp:
        route = f"http tcp:{appPort} tcp:127.0.0.1:{fp.port}"
        fp.set("reset_mid_response", after=100)

The proxy runs in a CHILD PROCESS with its own Twisted reactor: pytest's process (which
may run pytest-twisted's reactor, or none) never shares a reactor or a thread with it,
and the tests drive it through a small JSON-lines control socket on 127.0.0.1.  Every
control call is bounded by a 5 s timeout.  The child dies with its parent: it asks the
kernel for SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG: so start it
from the thread that outlives it, e.g. pytest's main thread) and it exits when its
stdin (a pipe from the parent) reaches end of file.

Modes (``set(mode, **params)``) apply to connections opened after the call, except
``latency`` and ``throttle``, which apply at once to every open connection, and
``killConnections()``, which resets every open connection now:

========================  ==================================================================
``pass``                  forward both ways untouched (the default)
``latency`` ms=50         delay every chunk each way by ``ms``
``reset_before_response`` accept, read the request, RST before any byte goes back;
                          ``forward=True`` first passes the request to the member and
                          resets when the member's first byte comes back (the member did
                          the work, the app never hears of it)
``reset_mid_response``    forward ``after`` (default 100) bytes of the member's answers
                          (counted over the connection's life), then RST both sides
``blackhole``             accept, read, never answer, never close
``accept_close``          accept and close at once (FIN)
``throttle``              member->app bandwidth limited to ``bytesPerSecond`` (20000)
``random``                per NEW connection: with probability ``p`` one of ``modes``
                          (drawn from a ``random.Random(seed)``), else ``pass``; the other
                          params (ms, after, bytesPerSecond, forward) go to the drawn mode
========================  ==================================================================

Every mode also takes ``kill=True``: reset every open connection first, as the mode
takes effect (a pooled connection would otherwise dodge a ``blackhole`` set later,
since modes bind at accept time); it works in ``schedule`` steps too.

A member the proxy cannot reach (refused, or no connection within 5 s): the app's
connection is closed (FIN), as HAProxy or any relay would.

``stats()["faults"]`` counts, per mode other than ``pass``, the connections that were
opened under it (a connection counts once, when it is accepted); ``connections`` counts
every accepted connection, ``open`` those still open, ``bytesUp``/``bytesDown`` the bytes
forwarded app->member and member->app.

Run as a script (``python faultproxy.py --target 127.0.0.1:6379``) it is the child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Self

#: The modes a proxy knows, and the parameters each takes (with their defaults).
MODES: dict[str, dict[str, Any]] = {
    "pass": {},
    "latency": {"ms": 50},
    "reset_before_response": {"forward": False},
    "reset_mid_response": {"after": 100},
    "blackhole": {},
    "accept_close": {},
    "throttle": {"bytesPerSecond": 20000},
    "random": {"p": 0.2, "modes": ["reset_before_response", "reset_mid_response", "latency"]},
}

#: Every control call gives up after this long.
CONTROL_TIMEOUT = 5.0


def _checkMode(mode: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate ``mode`` and its params; return the params with defaults filled in."""
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r} (known: {sorted(MODES)})")
    allowed = {**MODES[mode], "kill": False}
    if mode == "random":
        # the drawn mode's params ride along
        for name in ("latency", "reset_before_response", "reset_mid_response", "throttle"):
            allowed.update(MODES[name])
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"mode {mode!r} takes no {sorted(unknown)} (takes {sorted(allowed)})")
    merged = {**allowed, **params}
    if mode == "random":
        for drawn in merged["modes"]:
            if drawn not in MODES or drawn == "random":
                raise ValueError(f"random: cannot draw mode {drawn!r}")
        if not 0.0 <= float(merged["p"]) <= 1.0:
            raise ValueError("random: p must be within [0, 1]")
    return merged


# ---------------------------------------------------------------------------
# The parent side: what tests import.
# ---------------------------------------------------------------------------


class FaultProxy:
    """A fault proxy child process in front of ``target``, driven from the test.

    ``port``, ``address`` (the same as a Twisted client endpoint string) and every call
    wait for the child to listen (at most ``startTimeout`` seconds).
    """

    def __init__(
        self, target: tuple[str, int], seed: int = 0, port: int = 0,
        startTimeout: float = 30.0,
    ) -> None:
        self.target = target
        self.seed = seed
        command = [
            sys.executable, os.path.abspath(__file__),
            "--target", f"{target[0]}:{target[1]}", "--seed", str(seed),
            "--port", str(port), "--parent", str(os.getpid()),
        ]
        self._lock = threading.Lock()
        self._startTimeout = startTimeout
        self._hello: dict[str, int] | None = None
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )

    def _started(self) -> dict[str, int]:
        """The child's ports, once it listens: read lazily, so that several proxies
        created one after the other start up at the same time."""
        if self._hello is None:
            try:
                self._hello = json.loads(self._readLine(self._startTimeout))
            except BaseException:
                self.stop()
                raise
        return self._hello

    @property
    def port(self) -> int:
        return self._started()["port"]

    @property
    def controlPort(self) -> int:
        return self._started()["control"]

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _readLine(self, timeout: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fault proxy did not start within {timeout}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"fault proxy exited ({self.process.poll()}) before starting")
                data += chunk
        return data

    def _call(self, **command: Any) -> dict[str, Any]:
        """One control request and its answer, within CONTROL_TIMEOUT."""
        self._started()
        with self._lock:
            if self.process.poll() is not None:
                raise RuntimeError(f"fault proxy exited with {self.process.returncode}")
            deadline = time.monotonic() + CONTROL_TIMEOUT
            with socket.create_connection(("127.0.0.1", self.controlPort), timeout=CONTROL_TIMEOUT) as s:
                s.sendall(json.dumps(command).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = s.recv(65536)
                    if not chunk:
                        raise RuntimeError("fault proxy closed its control connection")
                    data += chunk
        answer = json.loads(data)
        if not answer.get("ok"):
            raise ValueError(answer.get("error", "fault proxy refused the command"))
        return answer

    def set(self, mode: str, **params: Any) -> None:
        """Misbehave as ``mode`` from now on (see the module docstring); cancels a schedule."""
        _checkMode(mode, params)
        self._call(cmd="set", mode=mode, params=params)

    def schedule(self, steps: Iterable[tuple[float, str, dict[str, Any]]], repeat: bool = True) -> None:
        """Run through ``(seconds, mode, params)`` steps (again and again if ``repeat``).

        Without ``repeat`` the last step's mode stays once its time is over.
        """
        steps = [(float(seconds), mode, dict(params)) for seconds, mode, params in steps]
        if not steps:
            raise ValueError("a schedule needs at least one step")
        for seconds, mode, params in steps:
            if seconds <= 0:
                raise ValueError("every step of a schedule needs a positive duration")
            _checkMode(mode, params)
        self._call(cmd="schedule", steps=steps, repeat=repeat)

    def stats(self) -> dict[str, Any]:
        """``{"connections", "open", "faults": {mode: count}, "bytesUp", "bytesDown", "mode"}``."""
        answer = self._call(cmd="stats")
        return answer["stats"]

    def killConnections(self) -> None:
        """Reset (RST) every open connection, both sides, now."""
        self._call(cmd="kill")

    def stop(self) -> None:
        """End the child (bounded: SIGTERM, then SIGKILL)."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# The child side: a Twisted program.  Nothing below runs in the test process.
# ---------------------------------------------------------------------------


def _childMain(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the member")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parent", type=int, default=0, help="the parent's pid (exit if it is gone)")
    options = parser.parse_args(argv)
    host, _, port = options.target.rpartition(":")
    target = (host, int(port))

    _dieWithParent(options.parent)

    from twisted.internet import reactor as _reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.basic import LineOnlyReceiver
    from zope.interface import implementer

    reactor: Any = _reactor

    def rst(transport: Any) -> None:
        """Close with a reset (SO_LINGER 0), not a FIN."""
        if transport is None:
            return
        try:
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        transport.abortConnection()

    class State:
        """The proxy's live settings and its counters."""

        def __init__(self, seed: int) -> None:
            self.mode = "pass"
            self.params: dict[str, Any] = {}
            self.rng = random.Random(seed)
            self.connections = 0
            self.faults: dict[str, int] = {}
            self.bytesUp = 0
            self.bytesDown = 0
            self.open: set[Any] = set()
            self.scheduleCall: Any = None

        def apply(self, mode: str, params: dict[str, Any]) -> None:
            self.mode, self.params = mode, _checkMode(mode, params)
            if self.params["kill"]:
                for pair in list(self.open):
                    pair.resetBoth()
            for pair in list(self.open):
                pair.settingsChanged()

        def assign(self) -> tuple[str, dict[str, Any]]:
            """The mode (and params) a new connection gets."""
            mode, params = self.mode, self.params
            if mode == "random":
                if self.rng.random() < float(params["p"]):
                    mode = self.rng.choice(list(params["modes"]))
                    params = _checkMode(mode, {k: v for k, v in params.items() if k in MODES[mode]})
                    params["kill"] = False
                else:
                    mode, params = "pass", {}
            if mode != "pass":
                self.faults[mode] = self.faults.get(mode, 0) + 1
            return mode, params

        def cancelSchedule(self) -> None:
            if self.scheduleCall is not None and self.scheduleCall.active():
                self.scheduleCall.cancel()
            self.scheduleCall = None

        def runSchedule(self, steps: list[list[Any]], repeat: bool, index: int = 0) -> None:
            seconds, mode, params = steps[index]
            self.apply(mode, params)
            following = index + 1
            if following == len(steps):
                if not repeat:
                    self.scheduleCall = None
                    return
                following = 0
            self.scheduleCall = reactor.callLater(seconds, self.runSchedule, steps, repeat, following)

    state = State(options.seed)

    class DelayLine:
        """Chunks (and the end of stream, as None) handed on in order, each after its delay."""

        def __init__(self, deliver: Callable[[bytes | None], None]) -> None:
            self.deliver = deliver
            self.queue: deque[tuple[float, bytes | None]] = deque()
            self.call: Any = None

        def push(self, data: bytes | None, delay: float) -> None:
            if delay <= 0 and not self.queue:
                self.deliver(data)
                return
            now = reactor.seconds()
            due = now + delay
            if self.queue:
                due = max(due, self.queue[-1][0])
            self.queue.append((due, data))
            self._arm()

        def _arm(self) -> None:
            if self.call is None and self.queue:
                self.call = reactor.callLater(max(0.0, self.queue[0][0] - reactor.seconds()), self._fire)

        def _fire(self) -> None:
            self.call = None
            now = reactor.seconds()
            while self.queue and self.queue[0][0] <= now + 0.0005:
                _, data = self.queue.popleft()
                self.deliver(data)
            self._arm()

        def cancel(self) -> None:
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.call = None
            self.queue.clear()

    class Throttle:
        """A token bucket on the member->app direction (the member is paused when it runs ahead)."""

        TICK = 0.01

        def __init__(self, pair: Pair) -> None:
            self.pair = pair
            self.buffer = bytearray()
            self.eof = False
            self.tokens = 0.0
            self.last = reactor.seconds()
            self.call: Any = None
            self.paused = False

        def push(self, data: bytes | None) -> None:
            rate = self.pair.throttleRate()
            if rate is None and not self.buffer and not self.eof:
                self.pair.deliverDown(data)
                return
            if data is None:
                self.eof = True
            else:
                self.buffer += data
            if len(self.buffer) > 256 * 1024 and not self.paused and self.pair.member is not None:
                self.paused = True
                self.pair.member.transport.pauseProducing()
            self._arm()

        def _arm(self) -> None:
            if self.call is None and (self.buffer or self.eof):
                self.call = reactor.callLater(self.TICK, self._tick)

        def _tick(self) -> None:
            self.call = None
            rate = self.pair.throttleRate()
            now = reactor.seconds()
            if rate is None:
                count = len(self.buffer)
            else:
                self.tokens = min(self.tokens + (now - self.last) * rate, max(rate * self.TICK * 5, 1.0))
                count = min(int(self.tokens), len(self.buffer))
                self.tokens -= count
            self.last = now
            if count:
                chunk = bytes(self.buffer[:count])
                del self.buffer[:count]
                self.pair.deliverDown(chunk)
            if self.eof and not self.buffer:
                self.eof = False
                self.pair.deliverDown(None)
            if self.paused and len(self.buffer) < 64 * 1024 and self.pair.member is not None:
                self.paused = False
                self.pair.member.transport.resumeProducing()
            self._arm()

        def cancel(self) -> None:
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.call = None
            self.buffer.clear()

    class Pair:
        """One app connection and (if its mode forwards) its member connection."""

        def __init__(self, app: AppSide) -> None:
            self.app = app
            self.member: MemberSide | None = None
            self.mode, self.params = state.assign()
            self.pendingUp: list[bytes | None] = []
            self.upDone = False
            self.downDone = False
            self.sentDown = 0
            self.closed = False
            self.resetting = False
            self.upLine = DelayLine(self.deliverUp)
            self.downLine = DelayLine(self.throttleDown)
            self.throttle = Throttle(self)

        # the live settings: latency and throttle follow the proxy's mode at once
        def latency(self) -> float:
            if state.mode == "latency":
                return float(state.params["ms"]) / 1000.0
            if self.mode == "latency" and state.mode == "random":
                return float(self.params["ms"]) / 1000.0
            return 0.0

        def throttleRate(self) -> float | None:
            if state.mode == "throttle":
                return float(state.params["bytesPerSecond"])
            if self.mode == "throttle" and state.mode == "random":
                return float(self.params["bytesPerSecond"])
            return None

        def settingsChanged(self) -> None:
            if self.throttle.buffer or self.throttle.eof:
                self.throttle._arm()

        def forwards(self) -> bool:
            if self.mode in ("blackhole", "accept_close"):
                return False
            if self.mode == "reset_before_response":
                return bool(self.params["forward"])
            return True

        def start(self) -> None:
            if self.mode == "accept_close":
                self.app.transport.loseConnection()
                return
            if not self.forwards():
                return
            endpoint = TCP4ClientEndpoint(reactor, target[0], target[1], timeout=5)
            d = endpoint.connect(Factory.forProtocol(lambda: MemberSide(self)))
            d.addErrback(self.memberFailed)

        def memberFailed(self, failure: Any) -> None:
            self.app.transport.loseConnection()

        def memberConnected(self, member: MemberSide) -> None:
            if self.closed:
                member.transport.abortConnection()
                return
            self.member = member
            pending, self.pendingUp = self.pendingUp, []
            for item in pending:
                self.deliverUp(item)

        # app -> member
        def fromApp(self, data: bytes | None) -> None:
            if self.mode == "blackhole":
                return
            if self.mode == "reset_before_response" and not self.params["forward"]:
                if data:
                    self.resetBoth()
                return
            self.upLine.push(data, self.latency())

        def deliverUp(self, data: bytes | None) -> None:
            if self.member is None:
                self.pendingUp.append(data)
                return
            if data is None:
                self.upDone = True
                self.member.transport.loseWriteConnection()
                self.maybeClose()
            else:
                state.bytesUp += len(data)
                self.member.transport.write(data)

        # member -> app
        def fromMember(self, data: bytes | None) -> None:
            if self.mode == "reset_before_response" and data:
                self.resetBoth()
                return
            self.downLine.push(data, self.latency())

        def throttleDown(self, data: bytes | None) -> None:
            self.throttle.push(data)

        def deliverDown(self, data: bytes | None) -> None:
            if self.resetting or self.closed:
                return
            if data is None:
                self.downDone = True
                self.app.transport.loseWriteConnection()
                self.maybeClose()
                return
            if self.mode == "reset_mid_response":
                room = int(self.params["after"]) - self.sentDown
                if len(data) >= room:
                    data = data[:room]
                    if data:
                        self.sentDown += len(data)
                        state.bytesDown += len(data)
                        self.app.transport.write(data)
                    # let the kernel send what was written before the reset discards it
                    self.resetting = True
                    if self.member is not None:
                        self.member.transport.pauseProducing()
                    reactor.callLater(0.02, self.resetBoth)
                    return
            self.sentDown += len(data)
            state.bytesDown += len(data)
            self.app.transport.write(data)

        def maybeClose(self) -> None:
            if self.upDone and self.downDone:
                self.app.transport.loseConnection()
                if self.member is not None:
                    self.member.transport.loseConnection()

        def resetBoth(self) -> None:
            self.resetting = True
            rst(self.app.transport)
            if self.member is not None:
                rst(self.member.transport)

        def appLost(self, clean: bool) -> None:
            self.closed = True
            state.open.discard(self)
            self.upLine.cancel()
            self.downLine.cancel()
            self.throttle.cancel()
            if self.member is not None and self.member.transport.connected:
                if clean:
                    self.member.transport.loseConnection()
                else:
                    rst(self.member.transport)

        def memberLost(self, clean: bool) -> None:
            if self.closed or self.resetting:
                return
            if clean:
                # the member closed without half-closing first: pass the end on in order
                self.fromMember(None)
            else:
                self.resetBoth()

    @implementer(IHalfCloseableProtocol)
    class AppSide(Protocol):
        pair: Pair

        def connectionMade(self) -> None:
            state.connections += 1
            self.pair = Pair(self)
            state.open.add(self.pair)
            self.pair.start()

        def dataReceived(self, data: bytes) -> None:
            self.pair.fromApp(data)

        def readConnectionLost(self) -> None:
            self.pair.fromApp(None)

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason: Any) -> None:
            from twisted.internet.error import ConnectionDone

            self.pair.appLost(reason.check(ConnectionDone) is not None)

    @implementer(IHalfCloseableProtocol)
    class MemberSide(Protocol):
        def __init__(self, pair: Pair) -> None:
            self.pair = pair
            self.eof = False

        def connectionMade(self) -> None:
            self.pair.memberConnected(self)

        def dataReceived(self, data: bytes) -> None:
            self.pair.fromMember(data)

        def readConnectionLost(self) -> None:
            self.eof = True
            self.pair.fromMember(None)

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason: Any) -> None:
            from twisted.internet.error import ConnectionDone

            if not self.eof:
                self.pair.memberLost(reason.check(ConnectionDone) is not None)

    class Control(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 20

        def lineReceived(self, line: bytes) -> None:
            try:
                answer = self.handle(json.loads(line))
            except Exception as e:  # noqa: BLE001 (a bad command is answered, never fatal)
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.sendLine(json.dumps(answer).encode())

        def handle(self, command: dict[str, Any]) -> dict[str, Any]:
            cmd = command.get("cmd")
            if cmd == "set":
                state.cancelSchedule()
                state.apply(command["mode"], command.get("params") or {})
            elif cmd == "schedule":
                steps = command["steps"]
                for _, mode, params in steps:
                    _checkMode(mode, params)
                state.cancelSchedule()
                state.runSchedule(steps, bool(command.get("repeat", True)))
            elif cmd == "stats":
                return {"ok": True, "stats": {
                    "connections": state.connections, "open": len(state.open),
                    "faults": dict(state.faults), "bytesUp": state.bytesUp,
                    "bytesDown": state.bytesDown, "mode": state.mode,
                }}
            elif cmd == "kill":
                for pair in list(state.open):
                    pair.resetBoth()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            return {"ok": True}

    def started(ports: list[Any]) -> None:
        sys.stdout.write(json.dumps({
            "port": ports[0].getHost().port, "control": ports[1].getHost().port,
        }) + "\n")
        sys.stdout.flush()

    def failed(failure: Any) -> None:
        sys.stderr.write(f"fault proxy could not listen: {failure.getErrorMessage()}\n")
        reactor.stop()

    from twisted.internet.defer import gatherResults

    proxyEndpoint = TCP4ServerEndpoint(reactor, options.port, backlog=512, interface="127.0.0.1")
    controlEndpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    d = gatherResults([
        proxyEndpoint.listen(Factory.forProtocol(AppSide)),
        controlEndpoint.listen(Factory.forProtocol(Control)),
    ], consumeErrors=True)
    d.addCallbacks(started, failed)
    reactor.addSystemEventTrigger("before", "shutdown", state.cancelSchedule)
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)


def _dieWithParent(parent: int) -> None:
    """Never outlive the test process: PR_SET_PDEATHSIG, and exit when stdin closes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:
        os._exit(0)  # the parent died before we could ask

    def watchStdin() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=watchStdin, daemon=True).start()


if __name__ == "__main__":
    _childMain(sys.argv[1:])
