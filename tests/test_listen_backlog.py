"""Listeners bind with the longest accept queue the kernel allows (ambassador.endpoints)."""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from ambassador import endpoints


@pytest.fixture(autouse=True)
def _somaxconn(monkeypatch):
    monkeypatch.setattr(endpoints, "_somaxconn", lambda: 4096)


@pytest.mark.parametrize("listen", [
    "tcp:8080:interface=127.0.0.1",
    "tcp6:8080:interface=\\:\\:1",
    "unix:/tmp/route.sock",
    "ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1",
])
def test_a_listener_without_backlog_gets_the_kernels_cap(listen):
    assert endpoints.withBacklog(listen) == f"{listen}:backlog=4096"


def test_a_backlog_given_is_kept():
    assert endpoints.withBacklog("tcp:8080:backlog=10") == "tcp:8080:backlog=10"


@pytest.mark.parametrize("listen", ["systemd:domain=INET:index=0", "thirdparty:whatever"])
def test_other_endpoints_are_left_alone(listen):
    assert endpoints.withBacklog(listen) == listen


def test_twisted_binds_with_it():
    reactor = MemoryReactor()
    serverFromString(reactor, endpoints.withBacklog("tcp:8080:interface=127.0.0.1")).listen(None)
    assert reactor.tcpServers[0][2] == 4096


def test_the_kernels_cap_is_read_from_proc(monkeypatch):
    monkeypatch.undo()
    assert endpoints._somaxconn() >= 1
