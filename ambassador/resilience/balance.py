"""Load balancing over the members that are usable now (healthy, breaker admitting).

Every balancer prefers members not yet tried for the request, so a retry goes
elsewhere when it can (SPEC §3); ``hash`` is the exception: a key belongs to its
member while that member is usable, else to the next usable member on the ring.
"""

from __future__ import annotations

import bisect
import hashlib
import random as _random
from typing import Any, Callable, Sequence

from zope.interface import implementer

from ambassador.interfaces import IBalancer


def _usable(members: Sequence[Any], exclude: Sequence[Any]) -> list[Any]:
    fresh = [m for m in members if m.usable and m not in exclude]
    if fresh:
        return fresh
    return [m for m in members if m.usable]


@implementer(IBalancer)
class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, members: Sequence[Any], exclude: Sequence[Any], key: Any) -> Any:
        count = len(members)
        fallback = None
        for step in range(count):
            member = members[(self._next + step) % count]
            if not member.usable:
                continue
            if member in exclude:
                fallback = fallback or member
                continue
            self._next = (self._next + step + 1) % count
            return member
        return fallback


@implementer(IBalancer)
class LeastRequest:
    """Power of two choices on in-flight attempts (Mitzenmacher): nearly as good as
    scanning every member, without the herd that always picking the least gives."""

    def __init__(self, random: Callable[[], float] = _random.random) -> None:
        self._random = random

    def pick(self, members: Sequence[Any], exclude: Sequence[Any], key: Any) -> Any:
        candidates = _usable(members, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        n = len(candidates)
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return a if a.inFlight <= b.inFlight else b


@implementer(IBalancer)
class Random:
    def __init__(self, random: Callable[[], float] = _random.random) -> None:
        self._random = random

    def pick(self, members: Sequence[Any], exclude: Sequence[Any], key: Any) -> Any:
        candidates = _usable(members, exclude)
        if not candidates:
            return None
        return candidates[int(self._random() * len(candidates))]


@implementer(IBalancer)
class HashRing:
    """Ketama-style consistent hashing: 160 points per member on a 32-bit ring, so
    adding or removing one of N members moves only about 1/N of the keys."""

    POINTS = 160

    def __init__(self) -> None:
        self._members: tuple[Any, ...] = ()
        self._points: list[int] = []
        self._owners: list[Any] = []

    def _build(self, members: Sequence[Any]) -> None:
        ring: list[tuple[int, int, Any]] = []
        for order, member in enumerate(members):
            for i in range(self.POINTS // 4):
                digest = hashlib.md5(f"{member.upstream}-{i}".encode()).digest()
                for k in range(4):
                    point = int.from_bytes(digest[k * 4:k * 4 + 4], "little")
                    ring.append((point, order, member))
        ring.sort(key=lambda entry: (entry[0], entry[1]))
        self._points = [p for p, _, _ in ring]
        self._owners = [m for _, _, m in ring]
        self._members = tuple(members)

    def owner(self, members: Sequence[Any], key: bytes) -> int:
        """The ring index that a key hashes to."""
        if tuple(members) != self._members:
            self._build(members)
        digest = hashlib.md5(key).digest()
        point = int.from_bytes(digest[:4], "little")
        return bisect.bisect_left(self._points, point) % len(self._points)

    def pick(self, members: Sequence[Any], exclude: Sequence[Any], key: Any) -> Any:
        if not members:
            return None
        if key is None:
            key = b""
        start = self.owner(members, key)
        seen: set[int] = set()
        for step in range(len(self._owners)):
            member = self._owners[(start + step) % len(self._owners)]
            if member.usable:
                return member
            seen.add(id(member))
            if len(seen) == len(members):
                break
        return None


BALANCERS: dict[str, Callable[[], IBalancer]] = {
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "random": Random,
    "hash": HashRing,
}
