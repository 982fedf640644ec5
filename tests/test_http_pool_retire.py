"""A member dropped by discovery: its pooled http connections close once idle (issue 8)."""

from twisted.internet.task import Clock

from ambassador.protocols.http.client import MemberPool


class FakeTransport:
    def resumeProducing(self):
        pass


class FakeConnection:
    def __init__(self, member):
        self.member = member
        self.connected = True
        self.transport = FakeTransport()
        self.abandoned = False

    def abandon(self):
        self.abandoned = True
        self.connected = False


class FakeMember:
    retired = False


def test_retiring_a_member_closes_its_idle_connections_and_refuses_busy_ones_later():
    pool = MemberPool(Clock(), maxIdle=8, idleTimeout=300, connectTimeout=2)
    gone, stays = FakeMember(), FakeMember()
    idle, other = FakeConnection(gone), FakeConnection(stays)
    busy = FakeConnection(gone)
    pool.put(idle)
    pool.put(other)

    gone.retired = True
    pool.retire(gone)
    assert idle.abandoned
    assert pool.take(gone) is None

    pool.put(busy)  # its exchange ended after the member was retired
    assert busy.abandoned
    assert pool.take(gone) is None

    assert not other.abandoned
    assert pool.take(stays) is other
