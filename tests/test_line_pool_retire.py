"""A member dropped by discovery: its pooled line connections close once idle (issue 8)."""

from twisted.internet.task import Clock

from ambassador.protocols.line.pool import Pool


class FakeConnection:
    def __init__(self, member, busy=False):
        self.member = member
        self.inFlight = [object()] if busy else []
        self.queued = []
        self.closed = False

    def close(self):
        if not self.inFlight and not self.queued:
            self.closed = True


def test_retiring_a_member_closes_its_idle_connections_now_and_busy_ones_once_drained():
    clock = Clock()
    pool = Pool(dialect=None, clock=clock, connectTimeout=2)
    gone, stays = object(), object()
    idle, busy, other = FakeConnection(gone), FakeConnection(gone, busy=True), FakeConnection(stays)
    pool.connections = {gone: [idle, busy], stays: [other]}

    pool.retire(gone)
    assert idle.closed and not busy.closed
    assert gone not in pool.connections  # no app connection gets them any more

    clock.advance(1.0)
    assert not busy.closed  # still answering its requests
    busy.inFlight.clear()
    clock.advance(1.0)
    assert busy.closed
    assert not clock.getDelayedCalls()  # nothing left to check
    assert not other.closed and pool.connections[stays] == [other]
