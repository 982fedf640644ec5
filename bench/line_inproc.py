"""Python CPU per request of the line route (route + resilience core + metrics), in
one process with in-memory transports: no sockets, no reactor, no other load's noise
beyond the CPU itself.  What redis_ops.py measures end to end, minus the system calls.

    python bench/line_inproc.py [--pipeline 16] [--apps 50] [--seconds 3] [--access-log]
    python bench/line_inproc.py --profile        # cProfile's top entries instead
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from ambassador.config import Route
from ambassador.metrics import Metrics
from ambassador.protocols.line.protocol import LineFactory
from ambassador.protocols.line.redis import encode, redisDialect
from ambassador.resilience.core import RouteCore


class NullTransport:
    """Just enough of a TCP transport: remembers what was written."""

    disconnecting = False

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.data.extend(seq)

    def take(self) -> bytes:
        out = b"".join(self.data)
        self.data.clear()
        return out

    def setTcpNoDelay(self, on: bool) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


class Endpoint:
    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(NullTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


def run(pipeline: int, apps: int, seconds: float, accessLog: bool, profile: bool) -> None:
    clock = Clock()
    endpoint = Endpoint()
    route = Route(name="bench", protocol="line", listen="tcp:1",
                  upstreams=("tcp:127.0.0.1:9",), options={"dialect": "redis"},
                  accessLog=accessLog)
    cores: list[Any] = []
    metrics = Metrics(lambda: cores)
    core = RouteCore(route, clock, lambda upstream, *a: endpoint, [metrics])
    cores.append(core)
    factory = LineFactory(route, core, clock, redisDialect)
    appConnections = []
    for _ in range(apps):
        app = factory.buildProtocol(None)
        app.makeConnection(NullTransport())
        appConnections.append(app)
    burst = b"".join(encode([b"GET", b"key:%012d" % i]) for i in range(pipeline))
    reply = b"$3\r\nxxx\r\n"

    def round_() -> None:
        for app in appConnections:
            app.dataReceived(burst)
        for member in endpoint.protocols:
            written = member.transport.take()
            if written:
                member.dataReceived(reply * written.count(b"*2\r\n"))
        for app in appConnections:
            app.transport.take()

    for _ in range(20):
        round_()
    gc.collect()
    gc.freeze()
    requests = 0
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    start = time.process_time()
    while time.process_time() - start < seconds:
        round_()
        requests += pipeline * apps
    used = time.process_time() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"pipeline={pipeline} apps={apps} access_log={accessLog}: "
          f"{requests} requests, {used / requests * 1e6:.2f} us CPU per request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    run(args.pipeline, args.apps, args.seconds, args.access_log, args.profile)


if __name__ == "__main__":
    main()
