"""The summary both demos print: success rates both ways, and what the ambassador did."""

from __future__ import annotations

import re
from collections import Counter


def report(logText: str, direct: int, through: int, calls: int, noun: str) -> None:
    """Print the comparison and, from the ambassador's log, attempts, results, breakers."""
    attempts = Counter(int(a) for a in re.findall(r"access#info\] \S+ \S+ attempts=(\d+)", logText))
    results = Counter(re.findall(r"access#info\] \S+ \S+ attempts=\d+ result=(\S+)", logText))
    breaker = re.findall(r"breaker of (\S+) is (\S+)", logText)
    print()
    print(f"{'':24}{'ok':>6}{'failed':>8}{'success':>10}")
    print(f"{'direct':24}{direct:>6}{calls - direct:>8}{direct / calls:>10.1%}")
    print(f"{'through the ambassador':24}{through:>6}{calls - through:>8}{through / calls:>10.1%}")
    print("\nwhat the ambassador did (from its access log):")
    for n in sorted(attempts):
        print(f"  {attempts[n]:4} {noun} took {n} attempt{'s' if n != 1 else ''}")
    for result, count in sorted(results.items()):
        print(f"  {count:4} {noun} ended {result}")
    print(f"  {len(breaker)} breaker changes:")
    for upstream, state in breaker[:10]:
        print(f"       {upstream} -> {state}")
    if len(breaker) > 10:
        print(f"       ... ({len(breaker) - 10} more)")
