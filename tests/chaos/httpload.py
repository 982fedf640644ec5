"""Seeded, bounded HTTP load through an http route, and the books it must balance.

Real clients (``http.client`` in threads, keep-alive and not, GET and POST) send
requests that each carry a unique ``x-request-id`` for a bounded time; every outcome
is written down.  :func:`auditHttp` then checks what issue 9 asks: every request got
exactly one answer (the member's 2xx for that very request, or the ambassador's own
502/503/504 with a SPEC reason), none took longer than the deadline (plus slack) to
its headers, no POST was applied twice, and the ambassador's metrics count the same
requests, attempts and retries the clients saw.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attr
from accounting import metricSum
from httpmember import HttpMember, expectedBody

#: SPEC §4 (http): the ambassador's own error answers, by status.
SPEC_REASONS: dict[int, set[str]] = {
    502: {"connect-failure", "tls-error", "reset", "protocol-error"},
    503: {"breaker-open", "budget-exhausted", "overloaded", "no-upstream"},
    504: {"timeout", "deadline"},
}


@attr.s(auto_attribs=True, slots=True)
class Outcome:
    """What one request got.

    ``kind``: ``ok`` (the member's complete 2xx for this request), ``error`` (the
    ambassador's own answer), ``truncated`` (the member's headers came, then the
    connection died mid-body), ``unanswered`` (no status line at all), ``wrong``
    (an answer that is not this request's, or not a SPEC answer), ``abandoned``
    (pipelined behind a truncated answer, or behind the ambassador's error answer that
    closed the connection: never taken up, and checked never applied).
    """

    requestId: str
    method: str
    kind: str = "unanswered"
    status: int = 0
    reason: str | None = None
    attempts: int | None = None
    headerSeconds: float = 0.0
    detail: str = ""
    #: Sent on a keep-alive connection that had carried a request before.
    reused: bool = False
    #: When it was sent (time.monotonic()).
    sentAt: float = 0.0


PathChooser = Callable[[random.Random], str]


def smallPaths(rng: random.Random) -> str:
    return f"/item?size={rng.choice((16, 64, 512, 2048))}"


class HttpLoad:
    """``clients`` threads sending requests to 127.0.0.1:``port`` for ``seconds``.

    @param pathFor: draws a request's path (and so its answer's size and delay).
    @param postShare: the share of requests that are POSTs (unsafe: never replayed).
    @param keepAliveShare: the share of connections that carry several requests.
    @param postBytes: the range of a POST body's size.
    @param pipelineShare: the share of connections that pipeline 2-8 requests at once.
    """

    def __init__(
        self, port: int, seconds: float, seed: int, clients: int = 8,
        pathFor: PathChooser = smallPaths, postShare: float = 0.3,
        keepAliveShare: float = 0.6, timeout: float = 20.0, pause: float = 0.0,
        postBytes: tuple[int, int] = (16, 600), pipelineShare: float = 0.0,
    ) -> None:
        self.port = port
        self.seconds = seconds
        self.seed = seed
        self.clients = clients
        self.pathFor = pathFor
        self.postShare = postShare
        self.keepAliveShare = keepAliveShare
        self.timeout = timeout
        self.pause = pause
        self.postBytes = postBytes
        self.pipelineShare = pipelineShare
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.endsAt = time.monotonic() + self.seconds
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> list[Outcome]:
        for thread in self._threads:
            thread.join(self.seconds + self.timeout + 10)
            assert not thread.is_alive(), "a load client is stuck past every timeout"
        return self.outcomes

    def run(self) -> list[Outcome]:
        self.start()
        return self.join()

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        serial = 0
        while time.monotonic() < self.endsAt:
            if self.pipelineShare and rng.random() < self.pipelineShare:
                serial = self._pipelined(rng, index, serial)
                continue
            keepAlive = rng.random() < self.keepAliveShare
            count = rng.randint(2, 20) if keepAlive else 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                for turn in range(count):
                    if time.monotonic() >= self.endsAt:
                        break
                    serial += 1
                    outcome = self._one(conn, rng, f"s{self.seed}c{index}n{serial}", keepAlive)
                    outcome.reused = turn > 0
                    with self._lock:
                        self.outcomes.append(outcome)
                    if outcome.kind != "ok" or conn.sock is None:
                        break  # a closed or broken connection carries nothing more
                    if self.pause:
                        time.sleep(rng.random() * self.pause)
            finally:
                conn.close()

    def _one(self, conn: http.client.HTTPConnection, rng: random.Random, requestId: str,
             keepAlive: bool) -> Outcome:
        method = "POST" if rng.random() < self.postShare else "GET"
        path = self.pathFor(rng)
        outcome = Outcome(requestId, method)
        headers = {"x-request-id": requestId}
        if not keepAlive:
            headers["Connection"] = "close"
        body = None
        if method == "POST":
            unit = requestId.encode() + b";"
            body = unit * (rng.randint(*self.postBytes) // len(unit) + 1)
        started = outcome.sentAt = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            outcome.headerSeconds = time.monotonic() - started
            outcome.detail = f"{type(e).__name__}: {e}"
            return outcome
        outcome.headerSeconds = time.monotonic() - started
        outcome.status = response.status
        outcome.reason = response.getheader("x-ambassador-error")
        attempts = response.getheader("x-ambassador-attempts")
        outcome.attempts = int(attempts) if attempts is not None and attempts.isdigit() else None
        echoed = response.getheader("x-request-id")
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            outcome.kind = "truncated"
            outcome.detail = f"{type(e).__name__} after the headers"
            conn.close()
            return outcome
        _judge(outcome, path, echoed, data)
        return outcome

    def _pipelined(self, rng: random.Random, index: int, serial: int) -> int:
        """2-8 requests written at once on one connection, their answers read in order.

        Answers must come in request order, each the right one; after an answer cut
        mid-body, or an error answer that closes the connection, the requests behind it
        are ``abandoned`` (never started: the ambassador serves a connection's requests
        one by one).
        """
        batch: list[tuple[Outcome, str]] = []
        wire = []
        for _ in range(rng.randint(2, 8)):
            serial += 1
            outcome = Outcome(f"s{self.seed}c{index}n{serial}", "POST" if rng.random() < self.postShare else "GET")
            path = self.pathFor(rng)
            body = b""
            if outcome.method == "POST":
                unit = outcome.requestId.encode() + b";"
                body = unit * (rng.randint(*self.postBytes) // len(unit) + 1)
            wire.append(f"{outcome.method} {path} HTTP/1.1\r\nHost: chaos\r\n"
                        f"x-request-id: {outcome.requestId}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
            outcome.reused = bool(batch)
            batch.append((outcome, path))
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        except OSError as e:
            for outcome, _ in batch:
                outcome.detail = f"connect: {e}"
            self._record([o for o, _ in batch])
            return serial
        with sock:
            started = time.monotonic()
            for outcome, _ in batch:
                outcome.sentAt = started
            try:
                sock.sendall(b"".join(wire))
            except OSError:
                pass  # what came back decides
            reader = _ResponseReader(sock)
            gone: str | None = None
            for outcome, path in batch:
                if gone is not None:
                    outcome.kind = "abandoned" if gone.startswith("abandoned") else "unanswered"
                    outcome.detail = f"pipelined behind {gone}"
                    continue
                try:
                    status, headers, data = reader.response()
                except (OSError, EOFError, ValueError) as e:
                    outcome.detail = f"{type(e).__name__}: {e}"
                    outcome.headerSeconds = time.monotonic() - started
                    gone = "an unanswered request"
                    continue
                # its deadline ran from when the ambassador took it up: the answer before
                outcome.headerSeconds = time.monotonic() - started
                outcome.status = status
                outcome.reason = headers.get("x-ambassador-error")
                attempts = headers.get("x-ambassador-attempts")
                outcome.attempts = int(attempts) if attempts is not None and attempts.isdigit() else None
                if data is None:
                    outcome.kind, outcome.detail = "truncated", "connection lost mid-body"
                    gone = f"abandoned: the answer to {outcome.requestId} was cut"
                    continue
                _judge(outcome, path, headers.get("x-request-id"), data)
                started = time.monotonic()
                if headers.get("connection", "").lower() == "close":
                    # The ambassador's error before it read the whole body (an upload
                    # cut short) closes the connection: what was pipelined behind it is
                    # never taken up.  Behind anything else, a close loses requests.
                    gone = (f"abandoned: {outcome.status} {outcome.reason} closed the connection"
                            if outcome.kind == "error" else f"'connection: close' on {outcome.requestId}")
        self._record([o for o, _ in batch])
        return serial

    def _record(self, outcomes: list[Outcome]) -> None:
        with self._lock:
            self.outcomes.extend(outcomes)


class _ResponseReader:
    """Reads HTTP/1.1 responses with a Content-Length, one after the other, off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the connection closed")
        self.buffer += data

    def response(self) -> tuple[int, dict[str, str], bytes | None]:
        """(status, headers, body); body None when the connection died mid-body."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ValueError(f"an answer without content-length: {head[:200]!r}")
        length = int(headers["content-length"])
        try:
            while len(self.buffer) < length:
                self._fill()
        except (OSError, EOFError):
            return status, headers, None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def _judge(outcome: Outcome, path: str, echoed: str | None, data: bytes) -> None:
    """Classify a complete answer: this request's 2xx, a SPEC error, or wrong."""
    requestId = outcome.requestId
    if 200 <= outcome.status < 300:
        size = int(path.split("size=")[1].split("&")[0]) if "size=" in path else 64
        if echoed != requestId:
            outcome.kind, outcome.detail = "wrong", f"answer for {echoed!r}"
        elif data != expectedBody(requestId, size):
            outcome.kind, outcome.detail = "wrong", f"body of {len(data)} bytes is not this request's"
        else:
            outcome.kind = "ok"
    elif outcome.status in SPEC_REASONS and outcome.reason in SPEC_REASONS[outcome.status]:
        outcome.kind = "error"
    else:
        outcome.kind = "wrong"
        outcome.detail = f"status {outcome.status} reason {outcome.reason!r}"
    if outcome.attempts is None:
        outcome.kind, outcome.detail = "wrong", "no x-ambassador-attempts header"


def auditHttp(
    outcomes: list[Outcome], member: HttpMember, metrics: dict[Any, float] | None, route: str,
    deadline: float, slack: float = 2.0, truncationAllowed: bool = False,
    membersStayed: bool = True,
) -> list[str]:
    """Every accounting rule of issue 9 that ``outcomes`` break; empty when the books balance.

    ``membersStayed=False`` (a reload removed a member): its per-member attempt series
    left /metrics with it, so attempts are not summed.
    """
    problems: list[str] = []
    kinds = Counter(o.kind for o in outcomes)
    for o in outcomes:
        if o.kind in ("unanswered", "wrong"):
            problems.append(f"{o.method} {o.requestId}: {o.kind} ({o.detail})")
        elif o.kind == "truncated" and not truncationAllowed:
            problems.append(f"{o.method} {o.requestId}: {o.kind} where nothing cuts bodies")
        if o.headerSeconds > deadline + slack:
            problems.append(f"{o.method} {o.requestId}: headers after {o.headerSeconds:.2f}s "
                            f"> deadline {deadline}s + {slack}s")
    applied = member.applied()
    sent = {o.requestId for o in outcomes}
    for (method, requestId), times in applied.items():
        if requestId not in sent:
            problems.append(f"the member applied {method} {requestId}, which no client sent")
        if method == "POST" and times > 1:
            problems.append(f"POST {requestId} applied {times} times")
    for o in outcomes:
        if o.kind == "ok" and applied[(o.method, o.requestId)] < 1:
            problems.append(f"{o.method} {o.requestId} answered 2xx but never applied")
        if o.kind == "abandoned" and applied[(o.method, o.requestId)]:
            problems.append(f"{o.method} {o.requestId} abandoned behind a cut answer, yet applied")
    if metrics is not None:
        answered = [o for o in outcomes if o.kind in ("ok", "error", "truncated", "wrong")]
        total = metricSum(metrics, "ambassador_requests_total", route=route)
        if total != len(answered):
            problems.append(f"ambassador_requests_total {total:.0f} != {len(answered)} requests answered "
                            f"({dict(kinds)})")
        okMetric = metricSum(metrics, "ambassador_requests_total", route=route, result="ok")
        if okMetric != kinds["ok"]:
            problems.append(f"requests_total{{result=ok}} {okMetric:.0f} != {kinds['ok']} complete 2xx answers")
        byReason = Counter(o.reason for o in outcomes if o.kind == "error")
        byReason["reset"] += kinds["truncated"]
        for reason, count in byReason.items():
            seen = metricSum(metrics, "ambassador_requests_total", route=route, result=reason)
            if seen != count:
                problems.append(f"requests_total{{result={reason}}} {seen:.0f} != {count} answers the clients saw")
        attempts = sum(o.attempts or 0 for o in answered)
        attemptsMetric = metricSum(metrics, "ambassador_attempts_total", route=route)
        if membersStayed and attemptsMetric != attempts:
            problems.append(f"ambassador_attempts_total {attemptsMetric:.0f} != {attempts} "
                            "(the sum of x-ambassador-attempts)")
        # A retry is counted when it is decided (SPEC §2: so the budget sees retries in
        # backoff).  When no member is usable by the time it would start (every breaker
        # open), the request ends with its last failure and that retry is never made: at
        # most one such retry per failed request that made an attempt.
        retries = sum(max(0, (o.attempts or 0) - 1) for o in answered)
        unmade = sum(1 for o in answered if o.kind == "error" and (o.attempts or 0) >= 1)
        retriesMetric = metricSum(metrics, "ambassador_retries_total", route=route)
        if not retries <= retriesMetric <= retries + unmade:
            problems.append(f"ambassador_retries_total {retriesMetric:.0f} is not within [{retries}, "
                            f"{retries + unmade}] (the retries the answers report, plus at most one "
                            "decided but never made per failed request)")
    return problems


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by kind and by error reason, for a report."""
    return {
        "requests": len(outcomes),
        "kinds": dict(Counter(o.kind for o in outcomes)),
        "reasons": dict(Counter(o.reason for o in outcomes if o.kind == "error")),
        "posts": sum(o.method == "POST" for o in outcomes),
        "maxHeaderSeconds": round(max((o.headerSeconds for o in outcomes), default=0.0), 3),
    }

