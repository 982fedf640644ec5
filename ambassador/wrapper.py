"""Wrapper mode (SPEC §8): ``twistd -n --pidfile= ambassador --config C -- CMD ARG...``.

For a legacy app that cannot be taught a sidecar: the ambassador starts CMD itself,
once every route listens, and tells it where each route is through
``AMBASSADOR_<ROUTE>_ADDR``.  It passes SIGTERM and SIGINT on to CMD (SIGHUP still
reloads the ambassador), lets CMD's stdout and stderr through untouched (the child
inherits the file descriptors), and when CMD exits it drains and exits with CMD's
exit status, or 128+N when signal N ended it.  A CMD that cannot be started makes
the ambassador exit 127.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
    ReactorNotRunning,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="ambassador")

#: The exit status when CMD cannot be started (as a shell does).
NOT_STARTED = 127
#: How long to wait for every route to listen before giving up on starting CMD.
LISTEN_WAIT = 30.0
FORWARDED = (signal.SIGTERM, signal.SIGINT)
#: systemd's socket-activation variables are the ambassador's, never CMD's (Twisted
#: removes LISTEN_PID and LISTEN_FDS when it reads them, but not LISTEN_FDNAMES).
_SOCKET_ACTIVATION = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def addressVariable(routeName: str) -> str:
    """``payments-v2.eu`` -> ``AMBASSADOR_PAYMENTS_V2_EU_ADDR``."""
    return "AMBASSADOR_" + re.sub(r"[-.]", "_", routeName.upper()) + "_ADDR"


def listeningAddress(address: Any) -> str:
    """What an app connects to, from the listening port's ``getHost()``.

    ``host:port``; ``[host]:port`` for IPv6; a listener on every interface gives the
    loopback address of its family; the socket path for ``unix:``.
    """
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode(sys.getfilesystemencoding()) if isinstance(name, bytes) else str(name)
    if isinstance(address, IPv6Address):
        host = address.host
        if host in ("::", "::0", "0:0:0:0:0:0:0:0"):
            host = "::1"
        return f"[{host}]:{address.port}"
    if isinstance(address, IPv4Address):
        host = "127.0.0.1" if address.host == "0.0.0.0" else address.host
        return f"{host}:{address.port}"
    raise ValueError(f"no address for a listener on {address!r}")


def routeEnvironment(routes: Mapping[str, Any]) -> dict[str, str]:
    """``AMBASSADOR_<ROUTE>_ADDR`` for every route service that listens."""
    environment = {}
    for name, service in routes.items():
        if service.port is not None:
            environment[addressVariable(name)] = listeningAddress(service.port.getHost())
    return environment


def exitStatus(reason: Failure) -> int:
    """A shell's view of how a process ended: its exit code, or 128+N for signal N."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return 0
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return 128 + value.signal
        if value.exitCode is not None:
            return value.exitCode
    return 1


class _Command(ProcessProtocol):
    def __init__(self, wrapper: Wrapper) -> None:
        self.wrapper = wrapper

    def processEnded(self, reason: Failure) -> None:
        self.wrapper.commandEnded(reason)


class Wrapper(Service):
    """Runs CMD next to the ambassador and makes the process live and die with it.

    @param ambassador: the ``AmbassadorService`` whose ``routes`` CMD will use.
    @param command: CMD and its arguments.
    @param exit: ends the process with a status (``os._exit`` after twistd is done;
        a fake in unit tests).
    @param installSignals: take over SIGTERM/SIGINT when the reactor runs.
    """

    def __init__(
        self, ambassador: Any, command: Sequence[str], reactor: Any,
        environ: Mapping[str, str] | None = None,
        exit: Callable[[int], None] | None = None,
        installSignals: bool = True,
    ) -> None:
        self.ambassador = ambassador
        self.command = list(command)
        self.reactor = reactor
        self.environ = dict(os.environ if environ is None else environ)
        self.exit = exit if exit is not None else _exitAfterTwistd
        self.installSignals = installSignals
        self.process: Any = None
        self.ended: Deferred[int] = Deferred()
        self.status: int | None = None
        self._waitingSince: float | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.reactor.callWhenRunning(self._whenRunning)

    def _whenRunning(self) -> None:
        if self.installSignals:
            for number in FORWARDED:
                # Replaces twistd's handler (installed by then): a SIGTERM is the app's
                # to act on; the ambassador stops when the app has exited.
                signal.signal(number, self._onSignal)
        self._startWhenListening()

    def _onSignal(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self.forward, number)

    def forward(self, number: int) -> None:
        """Pass a signal on to CMD; before CMD runs, it stops the ambassador."""
        if self.process is not None and self.status is None:
            log.info("wrapper: passing signal {signal} on to {command}",
                     signal=signal.Signals(number).name, command=self.command[0])
            try:
                self.process.signalProcess(number)
            except (ProcessExitedAlready, OSError) as e:  # processEnded follows
                log.info("wrapper: signal not delivered: {e}", e=e)
        elif self.process is None and self.status is None:
            self._finish(128 + number, f"signal {signal.Signals(number).name} before the command started")

    def _startWhenListening(self) -> None:
        if self.status is not None:
            return
        routes = self.ambassador.routes
        if all(service.port is not None for service in routes.values()):
            self._spawn()
            return
        now = self.reactor.seconds()
        if self._waitingSince is None:
            self._waitingSince = now
        if now - self._waitingSince > LISTEN_WAIT:
            waiting = ", ".join(name for name, s in routes.items() if s.port is None)
            self._finish(1, f"routes not listening after {LISTEN_WAIT:.0f}s: {waiting}")
            return
        self.reactor.callLater(0.05, self._startWhenListening)

    def _spawn(self) -> None:
        environment = {k: v for k, v in self.environ.items() if k not in _SOCKET_ACTIVATION}
        environment.update(routeEnvironment(self.ambassador.routes))
        name = self.command[0]
        executable = shutil.which(name, path=environment.get("PATH", os.defpath))
        if executable is None:
            problem = "no such file" if os.sep in name else "not found in PATH"
            if os.sep in name and os.path.exists(name):
                problem = "not executable"
            self._cannotStart(f"{name}: {problem}")
            return
        from ambassador.filelimit import childLimit

        try:
            with childLimit():  # CMD gets the open-file limit we were started with
                self.process = self.reactor.spawnProcess(
                    _Command(self), executable, self.command, env=environment,
                    childFDs={0: 0, 1: 1, 2: 2},
                )
        except OSError as e:
            self._cannotStart(f"{name}: {e.strerror or e}")
            return
        log.info("wrapper: started {command} (pid {pid}) with {variables}",
                 command=" ".join(self.command), pid=self.process.pid,
                 variables=" ".join(f"{k}={v}" for k, v in sorted(environment.items())
                                    if k.startswith("AMBASSADOR_")))

    def _cannotStart(self, problem: str) -> None:
        sys.stderr.write(f"ambassador: cannot start the command: {problem}\n")
        sys.stderr.flush()
        self._finish(NOT_STARTED, f"cannot start the command: {problem}")

    def commandEnded(self, reason: Failure) -> None:
        status = exitStatus(reason)
        self._finish(status, f"{self.command[0]} exited with status {status}")

    def _finish(self, status: int, why: str) -> None:
        """Drain and leave with ``status``."""
        if self.status is not None:
            return
        self.status = status
        log.info("wrapper: {why}; draining, then exiting {status}", why=why, status=status)
        self.ended.callback(status)
        self.reactor.addSystemEventTrigger("after", "shutdown", self.exit, status)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping: the drain under way ends the process

    def stopService(self) -> Deferred[Any]:
        """The ambassador stops while CMD runs (not through our signals): stop CMD too,
        and wait for it, since it may still need its routes."""
        Service.stopService(self)
        if self.process is None or self.status is not None:
            return succeed(None)
        try:
            self.process.signalProcess("TERM")
        except (ProcessExitedAlready, OSError):
            return succeed(None)
        waited: Deferred[None] = Deferred()

        def commandGone(result: Any) -> Any:
            if not waited.called:
                waited.callback(None)
            return result

        self.ended.addBoth(commandGone)
        bound = max((s.route.drainTimeout for s in self.ambassador.routes.values()), default=10.0)

        def kill() -> None:
            if not waited.called:
                with contextlib.suppress(ProcessExitedAlready, OSError):
                    self.process.signalProcess("KILL")

        self.reactor.callLater(bound, kill)
        return waited


def _exitAfterTwistd(status: int) -> None:
    """twistd itself always exits 0: leave with ``status`` once it is done.

    Registered from an 'after shutdown' trigger, so this atexit handler runs first at
    interpreter exit; the logs are flushed before ``os._exit``.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
                if stream is not None:
                    stream.flush()
        os._exit(status)

    atexit.register(leave)
