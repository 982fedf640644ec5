"""The context-free event dispatch (ambassador.dispatch): applied only to the epoll
reactor, and an exception escaping a handler is still logged, not raised."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python import log

from ambassador import dispatch


class Selectable:
    def logPrefix(self) -> str:
        return "MemberConnection,7,127.0.0.1"


def test_handler_result_is_returned() -> None:
    assert dispatch.callWithLogger(Selectable(), lambda a, b: a + b, 2, b=3) == 5


def test_escaping_exception_is_logged_with_the_prefix_and_swallowed() -> None:
    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        def handler() -> None:
            raise ValueError("boom")

        assert dispatch.callWithLogger(Selectable(), handler) is None
    finally:
        log.removeObserver(events.append)
    errors = [e for e in events if e.get("isError")]
    assert len(errors) == 1
    assert errors[0]["system"] == "MemberConnection,7,127.0.0.1"
    assert errors[0]["failure"].check(ValueError)


def test_buggy_log_prefix_still_logs() -> None:
    class Buggy:
        def logPrefix(self) -> str:
            raise RuntimeError("no prefix")

    events: list[dict[str, Any]] = []
    log.addObserver(events.append)
    try:
        dispatch.callWithLogger(Buggy(), lambda: 1 / 0)
    finally:
        log.removeObserver(events.append)
    assert [e["system"] for e in events if e.get("isError")] == ["(buggy logPrefix method)"]


def test_keyboard_interrupt_passes() -> None:
    def handler() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dispatch.callWithLogger(Selectable(), handler)


def test_applies_to_the_epoll_reactor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    epollreactor = pytest.importorskip("twisted.internet.epollreactor")
    monkeypatch.setattr(epollreactor, "log", log)  # undone after the test
    assert dispatch.streamlineDispatch(Clock()) is False
    assert epollreactor.log is log
    reactor = epollreactor.EPollReactor()
    try:
        assert dispatch.streamlineDispatch(reactor) is True
        assert epollreactor.log.callWithLogger is dispatch.callWithLogger
        assert epollreactor.log.err is log.err  # the rest is the real module
        assert dispatch.streamlineDispatch(reactor) is True  # idempotent
    finally:
        reactor._poller.close()


def test_leaves_a_reshaped_epollreactor_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    epollreactor = pytest.importorskip("twisted.internet.epollreactor")
    other = object()
    monkeypatch.setattr(epollreactor, "log", other)
    reactor = epollreactor.EPollReactor()
    try:
        assert dispatch.streamlineDispatch(reactor) is False
        assert epollreactor.log is other
    finally:
        reactor._poller.close()
