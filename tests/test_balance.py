"""Balancers (SPEC §3): they choose among usable members, and a retry prefers a
member not yet tried, except under ``hash``."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ambassador.interfaces import IBalancer
from ambassador.resilience.balance import (
    BALANCERS,
    HashRing,
    LeastRequest,
    Random,
    RoundRobin,
)
from ambassador.resilience.breaker import Breaker
from ambassador.resilience.member import Member

CLOCK = Clock()


def members(n: int, prefix: str = "tcp:10.0.0.") -> list[Member]:
    return [
        Member(f"{prefix}{i}:80", None, Breaker(CLOCK, 1, 10.0, 1))  # type: ignore[arg-type]
        for i in range(1, n + 1)
    ]


def openBreaker(member: Member) -> None:
    assert member.breaker.acquire()
    member.breaker.failure()
    assert not member.usable


def keys(n: int) -> list[bytes]:
    return [f"key:{i}".encode() for i in range(n)]


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_provides_ibalancer(name):
    assert verifyObject(IBalancer, BALANCERS[name]())


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_no_usable_member_gives_none(name):
    ms = members(2)
    for m in ms:
        openBreaker(m)
    assert BALANCERS[name]().pick(ms, [], b"k") is None
    assert BALANCERS[name]().pick([], [], b"k") is None


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_only_usable_members_are_picked(name):
    ms = members(3)
    openBreaker(ms[0])
    ms[2].healthy = False
    balancer = BALANCERS[name]()
    assert {balancer.pick(ms, [], k) for k in keys(50)} == {ms[1]}


# --- round robin -----------------------------------------------------------------------


def test_round_robin_goes_in_order():
    ms = members(3)
    rr = RoundRobin()
    assert [rr.pick(ms, [], None) for _ in range(7)] == [ms[0], ms[1], ms[2], ms[0], ms[1], ms[2], ms[0]]


def test_round_robin_skips_unusable_members():
    ms = members(3)
    rr = RoundRobin()
    ms[1].healthy = False
    assert [rr.pick(ms, [], None) for _ in range(4)] == [ms[0], ms[2], ms[0], ms[2]]


def test_round_robin_retry_prefers_a_member_not_yet_tried():
    ms = members(3)
    rr = RoundRobin()
    assert rr.pick(ms, [], None) is ms[0]
    # ms[1] would be next in turn, but it failed this request already
    assert rr.pick(ms, [ms[1]], None) is ms[2]


def test_round_robin_falls_back_to_a_tried_member_when_nothing_else_is_usable():
    ms = members(2)
    rr = RoundRobin()
    openBreaker(ms[1])
    assert rr.pick(ms, [ms[0]], None) is ms[0]


# --- least request ---------------------------------------------------------------------


@pytest.mark.parametrize("draw", [0.0, 0.3, 0.6, 0.99])
def test_least_request_picks_the_lower_in_flight_of_two(draw):
    ms = members(2)
    ms[0].inFlight, ms[1].inFlight = 5, 1
    assert LeastRequest(lambda: draw).pick(ms, [], None) is ms[1]
    ms[0].inFlight, ms[1].inFlight = 0, 1
    assert LeastRequest(lambda: draw).pick(ms, [], None) is ms[0]


def test_least_request_compares_two_distinct_members():
    ms = members(5)
    for i, m in enumerate(ms):
        m.inFlight = 10 - i
    rng = random.Random(3)
    picked = [LeastRequest(rng.random).pick(ms, [], None) for _ in range(500)]
    # The most loaded member can never win a comparison against another member.
    assert ms[0] not in picked
    assert ms[4] in picked


def test_least_request_retry_prefers_a_member_not_yet_tried():
    ms = members(2)
    ms[0].inFlight, ms[1].inFlight = 0, 9
    assert LeastRequest(random.Random(1).random).pick(ms, [ms[0]], None) is ms[1]


# --- random ----------------------------------------------------------------------------


def test_random_spreads_and_retry_prefers_a_member_not_yet_tried():
    ms = members(3)
    balancer = Random(random.Random(5).random)
    assert {balancer.pick(ms, [], None) for _ in range(100)} == set(ms)
    assert {balancer.pick(ms, [ms[0], ms[1]], None) for _ in range(20)} == {ms[2]}


# --- hash ------------------------------------------------------------------------------


def test_hash_is_stable_for_a_key():
    ms = members(4)
    first = {k: HashRing().pick(ms, [], k) for k in keys(200)}
    again = HashRing()
    assert all(again.pick(ms, [], k) is m for k, m in first.items())
    assert len(set(first.values())) == 4  # every member owns some keys


def test_hash_ownership_depends_on_the_member_names_not_their_objects():
    ring, other = HashRing(), HashRing()
    one, two = members(4), members(4)
    assert [ring.pick(one, [], k).upstream for k in keys(200)] == [
        other.pick(two, [], k).upstream for k in keys(200)
    ]


def test_adding_a_member_moves_about_one_nth_of_the_keys_all_to_it():
    four = members(4)
    five = four + members(1, prefix="tcp:10.0.1.")
    ring = HashRing()
    before = {k: ring.pick(four, [], k) for k in keys(3000)}
    after = {k: ring.pick(five, [], k) for k in keys(3000)}
    moved = [k for k in before if after[k] is not before[k]]
    assert 0.12 < len(moved) / len(before) < 0.28  # ~1/5
    assert all(after[k] is five[4] for k in moved)


def test_hash_skips_an_open_member_to_the_next_on_the_ring():
    ms = members(4)
    openBreaker(ms[2])
    ring, without = HashRing(), HashRing()
    rest = [ms[0], ms[1], ms[3]]
    for k in keys(500):
        # the next member on the ring is the one that would own the key without it
        assert ring.pick(ms, [], k) is without.pick(rest, [], k)


def test_hash_keeps_the_key_on_its_member_even_on_retry():
    ms = members(3)
    ring = HashRing()
    for k in keys(50):
        owner = ring.pick(ms, [], k)
        assert ring.pick(ms, [owner], k) is owner
