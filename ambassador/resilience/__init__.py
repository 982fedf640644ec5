"""The shared resilience core: retry with backoff and budget, deadlines, breakers,
balancing.  It knows nothing of HTTP, TCP or Redis; any Twisted program can use it.
"""

from ambassador.resilience.backoff import backoffDelay
from ambassador.resilience.balance import BALANCERS, HashRing, LeastRequest, Random, RoundRobin
from ambassador.resilience.breaker import CLOSED, HALF_OPEN, OPEN, STATE_VALUES, Breaker
from ambassador.resilience.budget import RetryBudget
from ambassador.resilience.core import Outcome, RequestRecord, RouteCore
from ambassador.resilience.member import Member
from ambassador.resilience.reasons import AttemptFailed, RequestFailed, classify

__all__ = [
    "BALANCERS", "CLOSED", "HALF_OPEN", "OPEN", "STATE_VALUES", "AttemptFailed", "Breaker",
    "HashRing", "LeastRequest", "Member", "Outcome", "Random", "RequestFailed", "RequestRecord",
    "RetryBudget", "RoundRobin", "RouteCore", "backoffDelay", "classify",
]
