"""Access-log lines and --log-format json (SPEC §6)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ambassador.config import Route
from ambassador.logs import ACCESS_FIELDS, formatJSON, jsonObserver
from ambassador.resilience import RequestRecord, RouteCore
from ambassador.resilience import core as coreModule


def makeCore(accessLog: bool) -> RouteCore:
    route = Route(name="r", protocol="tcp", listen="tcp:1:interface=127.0.0.1",
                  upstreams=("tcp:127.0.0.1:1",), accessLog=accessLog)
    return RouteCore(route, Clock(), lambda upstream: None)


@pytest.fixture
def accessEvents(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The events the core's access logger emits."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(coreModule, "accessLog",
                        Logger(namespace="ambassador.access", observer=events.append))
    return events


def test_an_access_event_has_every_spec_field(accessEvents: list[dict[str, Any]]) -> None:
    makeCore(True).finished(
        RequestRecord("tcp:127.0.0.1:1", 2, "ok", 0.0125, bytesIn=7, bytesOut=9, status=200)
    )
    [event] = accessEvents
    assert {k: event[k] for k in ACCESS_FIELDS} == {
        "route": "r", "upstream": "tcp:127.0.0.1:1", "attempts": 2, "result": "ok",
        "status": 200, "bytes_in": 7, "bytes_out": 9, "duration_ms": 12.5,
    }


def test_access_log_off_emits_no_event(accessEvents: list[dict[str, Any]]) -> None:
    class Unformattable:
        def __format__(self, spec: str) -> str:
            raise AssertionError("formatted although the access log is off")

    record = RequestRecord(Unformattable(), 1, "ok", 0.1)  # type: ignore[arg-type]
    makeCore(False).finished(record)
    assert accessEvents == []


def test_json_access_line_has_exactly_the_access_fields(
    accessEvents: list[dict[str, Any]],
) -> None:
    makeCore(True).finished(RequestRecord(None, 0, "breaker-open", 0.001))
    line = formatJSON(accessEvents[0])
    assert line.endswith("\n") and line.count("\n") == 1
    document = json.loads(line)
    assert list(document) == list(ACCESS_FIELDS)
    assert document["upstream"] is None and document["status"] is None
    assert document["result"] == "breaker-open" and document["attempts"] == 0


def test_other_events_are_one_line_with_their_message_and_traceback() -> None:
    stream = io.StringIO()
    log = Logger(namespace="ambassador", observer=jsonObserver(stream))
    log.info("route {route}: breaker of {upstream} is {state}", route="r",
             upstream="tcp:a:1", state="open")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("it broke\non two lines", Failure())
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "route r: breaker of tcp:a:1 is open"
    assert first["level"] == LogLevel.info.name and first["namespace"] == "ambassador"
    assert isinstance(first["time"], float)
    assert second["level"] == "critical"
    assert "ZeroDivisionError" in second["failure"]


def test_a_field_json_cannot_encode_still_gives_a_valid_line() -> None:
    event = {"log_namespace": "ambassador.access", "route": object(), "attempts": 1}
    document = json.loads(formatJSON(event))
    assert document["route"].startswith("<object")


# --- the text observer: twistd's own lines, cheaper -------------------------------------

def _twistedText(event: dict[str, Any]) -> str:
    from twisted.logger import textFileLogObserver

    stream = io.StringIO()
    textFileLogObserver(stream)(dict(event))
    return stream.getvalue()


def _ourText(event: dict[str, Any]) -> str:
    from ambassador.logs import textObserver

    stream = io.StringIO()
    textObserver(stream)(dict(event))
    return stream.getvalue()


def test_text_access_lines_are_exactly_twisteds(accessEvents: list[dict[str, Any]]) -> None:
    core = makeCore(True)
    core.finished(RequestRecord("tcp:127.0.0.1:1", 2, "ok", 0.0125, bytesIn=7, bytesOut=9,
                                status=200))
    core.finished(RequestRecord(None, 0, "breaker-open", 0.001))
    core.finished(RequestRecord("unix:/tmp/a\nb", 1, "reset", 1e-7))
    for event in accessEvents:
        for when in (1764171000.25, 1764171000.9999996, 0.0):
            event["log_time"] = when
            assert _ourText(event) == _twistedText(event)


def test_text_other_events_are_exactly_twisteds() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="ambassador", observer=events.append)
    log.info("route {route}: {n} members\nsecond line", route="r", n=3)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    events.append({"log_format": "{a} x", "log_system": "sys", "a": 1, "log_time": 5.5})
    events.append({"log_namespace": "ambassador.access", "log_format": "odd {x}", "x": 1})
    for event in events:
        assert _ourText(event) == _twistedText(event)


def test_access_lines_are_flushed_within_access_flush_seconds() -> None:
    from ambassador.logs import ACCESS_FLUSH, textObserver

    class Stream(io.StringIO):
        """Counts flushes: one per write, as PYTHONUNBUFFERED=1 stdout would."""

        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    stream, clock = Stream(), Clock()
    observer = textObserver(stream, clock)
    access: list[dict[str, Any]] = []
    coreLog = Logger(namespace="ambassador.access", observer=access.append)
    for _ in range(3):
        coreLog.info(coreModule.ACCESS_FORMAT, route="r", upstream=None, attempts=0,
                     result="ok", status=None, bytes_in=0, bytes_out=0, duration_ms=0.0)
    for event in access:
        observer(event)
    assert stream.getvalue() == "" and stream.flushes == 0
    clock.advance(ACCESS_FLUSH * 0.99)
    assert stream.flushes == 0
    clock.advance(ACCESS_FLUSH * 0.01)
    assert stream.flushes == 1 and stream.getvalue().count("\n") == 3
    observer(access[0])
    Logger(namespace="ambassador", observer=observer).info("not an access line")
    assert stream.flushes == 2  # at once, with the access line before it
    assert stream.getvalue().splitlines()[-2:][1].endswith("not an access line")
    assert stream.getvalue().count("\n") == 5 and not clock.getDelayedCalls()


def test_access_lines_are_written_once_a_buffer_full_waits() -> None:
    from ambassador.logs import ACCESS_BUFFER, textObserver

    stream, clock = io.StringIO(), Clock()
    observer = textObserver(stream, clock)
    event = {"log_namespace": "ambassador.access", "log_format": coreModule.ACCESS_FORMAT,
             "log_level": LogLevel.info, "log_time": 0.0, "route": "r" * 1000,
             "upstream": None, "attempts": 0, "result": "ok", "status": None, "bytes_in": 0,
             "bytes_out": 0, "duration_ms": 0.0}
    written = 0
    while not stream.getvalue():
        observer(event)
        written += 1
        assert written <= ACCESS_BUFFER // 1000 + 1
    assert stream.getvalue().count("\n") == written and not clock.getDelayedCalls()
