"""A DNS server of the tests' own, for ``dns:``/``srv:`` discovery (SPEC §2 ``[dns]``).

Run as a child process (``DNSPeer``), so tests stay synchronous and can stop it
for real (the "DNS server gone" case).  It answers UDP (and TCP) on 127.0.0.1 on a
free port from a JSON zone file the test rewrites at will (read again at every
query), and appends every query it sees to a log, so a test can show that the
ambassador asked this server.

Zone file: ``{"NAME": {"ttl": 1, "A": ["127.0.0.1"], "AAAA": [], "SRV": [[priority,
weight, port, "target"]]}}``; a name not in the zone is NXDOMAIN; a name with
``"servfail": true`` answers SERVFAIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent


class DNSPeer:
    """Controls the child DNS server.

    @ivar port: its UDP (and TCP) port on 127.0.0.1.
    """

    def __init__(self, tmp: Path, zone: dict[str, Any], port: int | None = None) -> None:
        from harness import freePort

        self.tmp = Path(tmp)
        self.zonePath = self.tmp / "zone.json"
        self.queryLog = self.tmp / "dns-queries.log"
        self.queryLog.write_text("")
        self.port = port or freePort()
        self.setZone(zone)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.logFile = open(self.tmp / "dnspeer.out", "ab")  # noqa: SIM115 - the child's stdout while it runs
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "dnspeer.py"), str(self.port), str(self.zonePath),
             str(self.queryLog)],
            stdout=self.logFile, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while "ready" not in (self.tmp / "dnspeer.out").read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dnspeer did not start:\n" + (self.tmp / "dnspeer.out").read_text())
            time.sleep(0.05)

    def setZone(self, zone: dict[str, Any]) -> None:
        """Replace every record at once (atomically: a query never sees half a file)."""
        temporary = self.zonePath.with_suffix(".tmp")
        temporary.write_text(json.dumps(zone))
        os.replace(temporary, self.zonePath)

    def queries(self) -> list[tuple[str, str, str]]:
        """(client address, name, type) of every query seen so far."""
        lines = self.queryLog.read_text().splitlines()
        return [tuple(line.split(" ", 2)) for line in lines if line]  # type: ignore[misc]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self.logFile.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(port: int, zonePath: str, queryLog: str) -> None:
    """The child: a twisted.names server whose only authority is the zone file."""
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, error, server

    class ZoneFile(common.ResolverBase):
        def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
            zone = json.loads(Path(zonePath).read_text())
            key = name.decode().lower().rstrip(".")
            entry = zone.get(key)
            if entry is None:
                return defer.fail(error.AuthoritativeDomainError(name))
            if entry.get("servfail"):
                return defer.fail(error.DNSServerError(name))
            ttl = int(entry.get("ttl", 1))
            answers = []
            if type in (dns.A, dns.ALL_RECORDS):
                answers += [dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(a, ttl))
                            for a in entry.get("A", [])]
            if type in (dns.AAAA, dns.ALL_RECORDS):
                answers += [dns.RRHeader(name, dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(a, ttl))
                            for a in entry.get("AAAA", [])]
            if type in (dns.SRV, dns.ALL_RECORDS):
                answers += [
                    dns.RRHeader(name, dns.SRV, ttl=ttl,
                                 payload=dns.Record_SRV(p, w, port_, target, ttl))
                    for p, w, port_, target in entry.get("SRV", [])
                ]
            for answer in answers:
                answer.auth = True
            return defer.succeed((answers, [], []))

    class LoggingFactory(server.DNSServerFactory):
        def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:
            with open(queryLog, "a") as log:
                for query in message.queries:
                    host = address[0] if address else "tcp"
                    log.write(f"{host} {query.name.name.decode()} {dns.QUERY_TYPES.get(query.type, query.type)}\n")
            return server.DNSServerFactory.handleQuery(self, message, protocol, address)

    factory = LoggingFactory(authorities=[ZoneFile()])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
