"""The config loader fuzzed (issue 9; SPEC §2: bad configuration is refused, and every
error names the file, the route and the key).

Random TOML documents, built from the SPEC §2 keys with good and bad values of every
TOML type (and from random keys, huge integers, NaN and infinities), random bytes and
random ``--route`` strings go to :func:`ambassador.config.loadConfig`.  It must either
return a ``Config`` or raise ``ConfigError`` whose every message starts with the file
(or ``--route``) and names a key; nothing else may escape it.  A valid config with one
key set to a random value must load or be refused with errors that name that key.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ambassador.config import Config, ConfigError, loadConfig, loadProtocols

PROTOCOLS = loadProtocols()
#: A loader call longer than this is taken for an endless loop (regex backtracking, ...).
CALL_BOUND = 10


@contextlib.contextmanager
def bounded(seconds: int = CALL_BOUND) -> Iterator[None]:
    def expired(signum, frame):  # type: ignore[no-untyped-def]
        raise AssertionError(f"loadConfig ran over {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- TOML text from Python values -----------------------------------------------------


def tomlString(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML wants DEL escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def tomlValue(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return tomlString(value)
    if isinstance(value, list):
        return "[" + ", ".join(tomlValue(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{tomlString(k)} = {tomlValue(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def tomlDocument(document: dict[str, Any]) -> str:
    """Every table inline, every array of tables an array of inline tables: valid TOML."""
    return "".join(f"{tomlString(k)} = {tomlValue(v)}\n" for k, v in document.items())


def same(a: Any, b: Any) -> bool:
    """Equality with NaN equal to itself."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# --- strategies over SPEC §2 ---------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63), 10**400, -(10**400)]),
    st.floats(),
    st.text(max_size=12),
)
anyValue = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=6,
)
durations = st.one_of(
    st.sampled_from(["5s", "250ms", "1m", "2h", "0s", "-1s", "1.5s", ".5s", "5", "5 s", "s",
                     "1e3s", "9" * 400 + "s", "9" * 400 + "ms", ""]),
    st.integers(-5, 100), st.floats(), st.sampled_from([10**400, 2**64]),
)
sizes = st.one_of(
    st.sampled_from(["1MiB", "64KiB", "1GiB", "10B", "-1", "1.5MiB", "9" * 400, "9" * 400 + "GiB",
                     "1 TiB", ""]),
    st.integers(-5, 2**40), st.sampled_from([10**400]),
)
endpoints = st.one_of(
    st.sampled_from([
        "tcp:0", "tcp:127.0.0.1:1", "tcp:localhost:6379", "unix:/tmp/fuzz.sock", "tcp6:0",
        "tls:example.com:443", "dns:example.internal:80", "srv:_redis._tcp.example.internal",
        "tcp:", "tcp:notaport", "bogus:1", ":", "tcp:0:interface=0.0.0.0", "tcp:99999",
        "unix:path=/tmp/x", "dns:-bad-:80", "dns:a:0", "srv:", "tls:h:443:trustRoots=/nonexistent",
    ]),
    st.text(max_size=20),
)
members = st.one_of(st.lists(endpoints, max_size=3), anyValue)


def keyed(known: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables of some known keys (good and bad values) and, now and then, an unknown key."""
    return st.fixed_dictionaries(
        {}, optional={**known, "typo_key": anyValue, "TIMEOUT": anyValue},
    ).flatmap(lambda d: st.dictionaries(st.text(max_size=6), anyValue, max_size=1).map(
        lambda extra: {**extra, **d}))


common = {
    "connect_timeout": durations, "timeout": durations, "deadline": durations,
    "idle_timeout": durations, "header_timeout": durations, "drain_timeout": durations,
    "max_connections": st.one_of(st.integers(-2, 5000), anyValue),
    "balance": st.one_of(st.sampled_from(["round_robin", "least_request", "random", "hash", "rr"]), anyValue),
    "access_log": st.one_of(st.booleans(), anyValue),
}
retry = keyed({
    "attempts": st.one_of(st.integers(-1, 200), anyValue), "backoff_base": durations,
    "backoff_max": durations, "budget_ratio": st.one_of(st.floats(), anyValue),
    "budget_min_per_second": st.one_of(st.floats(), anyValue),
})
breaker = keyed({
    "failure_threshold": st.one_of(st.integers(-1, 10), anyValue), "reset_timeout": durations,
    "half_open_max": st.one_of(st.integers(-1, 10), anyValue),
})
health = keyed({
    "interval": durations, "timeout": durations,
    "unhealthy_threshold": st.integers(-1, 5), "healthy_threshold": st.integers(-1, 5),
    "path": st.one_of(st.sampled_from(["/health", "health", ""]), anyValue),
    "expect_status": st.one_of(st.integers(0, 1000), anyValue),
})
tls = keyed({
    "server_name": st.one_of(st.just("example.com"), anyValue),
    "trust_roots": st.one_of(st.sampled_from(["/nonexistent", "/etc/hostname", "/"]), anyValue),
    "certificate": st.one_of(st.just("/nonexistent.pem"), anyValue),
    "private_key": st.one_of(st.just("/nonexistent.key"), anyValue),
})
routeTable = keyed({
    "name": st.one_of(st.sampled_from(["api", "cache", "a b", "", "dup"]), anyValue),
    "protocol": st.one_of(st.sampled_from(["http", "tcp", "line", "udp"]), anyValue),
    "dialect": st.one_of(st.sampled_from(["redis", "memcached", "line", "mongo"]), anyValue),
    "listen": st.one_of(endpoints, anyValue),
    "upstreams": members,
    "retry_on": st.one_of(st.lists(st.sampled_from(["reset", "503", 503, 99, "soon", "timeout"])), anyValue),
    "retry_methods": st.one_of(st.lists(st.sampled_from(["GET", "post", "BAD METHOD", ""])), anyValue),
    "host_header": st.one_of(st.sampled_from(["api.internal", "a b", "h:8080"]), anyValue),
    "max_retry_body": sizes, "trace": st.one_of(st.booleans(), anyValue),
    "idempotent": st.one_of(st.booleans(), anyValue),
    **common,
    "retry": st.one_of(retry, anyValue), "breaker": breaker, "health": health, "tls": tls,
})
documents = keyed({
    "admin": st.one_of(keyed({"listen": st.one_of(endpoints, st.just("none"), anyValue)}), anyValue),
    "dns": st.one_of(keyed({
        "servers": st.one_of(st.lists(st.sampled_from(["127.0.0.1:53", "[::1]:53", "::1", "h:0", "h:x", ""])), anyValue),
        "refresh": durations,
    }), anyValue),
    "defaults": st.one_of(keyed({**common, "retry": retry, "breaker": breaker, "health": health}), anyValue),
    "route": st.one_of(st.lists(st.one_of(routeTable, anyValue), max_size=3), anyValue),
})


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzzconfig") as tmp:
        yield Path(tmp)


def load(path: Path, routeSpecs: tuple[str, ...] = ()) -> Config | ConfigError:
    """loadConfig's outcome: the Config or the ConfigError; anything else propagates."""
    with bounded():
        try:
            return loadConfig(str(path) if path is not None else None, routeSpecs, protocols=PROTOCOLS)
        except ConfigError as e:
            return e


def checkMessages(error: ConfigError, source: str) -> None:
    assert error.errors, "a ConfigError without a message"
    for message in error.errors:
        assert message.startswith(f"{source}: "), message
        rest = message[len(source) + 2:]
        assert (
            rest.startswith(("not valid TOML:", "cannot read:"))
            or 'key "' in rest
            or (rest.split(": ")[0].startswith(("route[", "--route[")) and ": " in rest)
        ), f"names no key: {message}"


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents)
@example({"defaults": {"timeout": 10**400}, "route": [{"protocol": "tcp", "listen": "tcp:0", "upstreams": ["tcp:127.0.0.1:1"]}]})
@example({"route": [{"protocol": "http", "listen": "tcp:0", "upstreams": ["tcp:127.0.0.1:1"], "max_retry_body": "9" * 400}]})
@example({"defaults": {"retry": {"budget_ratio": 10**400}}, "route": [{"protocol": "tcp", "listen": "tcp:0", "upstreams": ["tcp:127.0.0.1:1"]}]})
@example({"route": [{"protocol": "tcp", "listen": "tcp:0", "upstreams": [""], "tls": {}}]})
def test_random_documents_load_or_name_the_key(workdir, document) -> None:
    text = tomlDocument(document)
    assert same(tomllib.loads(text), document)  # the loader, not TOML, is under test
    path = workdir / "fuzz.toml"
    path.write_text(text)
    outcome = load(path)
    if isinstance(outcome, ConfigError):
        checkMessages(outcome, str(path))
    else:
        assert isinstance(outcome, Config) and outcome.routes


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
@example(b"[[route]]\nprotocol = \"tcp\"\nlisten = \"tcp:0\"\nupstreams = [\"tcp:127.0.0.1:1\"]\n\xff")
@example(b"a = 1\na = 2\n")
def test_random_bytes_load_or_name_the_key(workdir, data) -> None:
    path = workdir / "bytes.toml"
    path.write_bytes(data)
    outcome = load(path)
    if isinstance(outcome, ConfigError):
        checkMessages(outcome, str(path))


# --- one key of a valid config set to anything --------------------------------------

BASE: dict[str, Any] = {
    "admin": {"listen": "tcp:0"},
    "dns": {"refresh": "30s"},
    "defaults": {"timeout": "5s", "deadline": "15s", "retry": {"attempts": 3, "backoff_base": "50ms",
                 "backoff_max": "2s"}, "breaker": {"failure_threshold": 5}},
    "route": [
        {"name": "web", "protocol": "http", "listen": "tcp:0", "upstreams": ["tcp:127.0.0.1:1"],
         "retry_on": ["reset", "503"], "max_retry_body": "1MiB", "timeout": "1s",
         "retry": {"attempts": 2}, "health": {"interval": "5s", "path": "/health"}},
        {"name": "cache", "protocol": "line", "dialect": "redis", "listen": "tcp:0",
         "upstreams": ["tcp:127.0.0.1:2", "tcp:127.0.0.1:3"], "balance": "hash"},
        {"name": "db", "protocol": "tcp", "listen": "tcp:0", "upstreams": ["tcp:127.0.0.1:4"],
         "idle_timeout": "5m", "breaker": {"reset_timeout": "10s"}},
    ],
}

#: (path in BASE, the key name every error must mention).
TARGETS = [
    (("admin", "listen"), "listen"),
    (("dns", "refresh"), "refresh"),
    (("defaults", "timeout"), "timeout"),
    (("defaults", "retry", "attempts"), "attempts"),
    (("defaults", "retry", "backoff_max"), "backoff_max"),
    (("defaults", "breaker", "failure_threshold"), "failure_threshold"),
    (("route", 0, "name"), "name"),
    (("route", 0, "listen"), "listen"),
    (("route", 0, "upstreams"), "upstreams"),
    (("route", 0, "retry_on"), "retry_on"),
    (("route", 0, "max_retry_body"), "max_retry_body"),
    (("route", 0, "timeout"), "timeout"),
    (("route", 0, "retry", "attempts"), "attempts"),
    (("route", 0, "health", "path"), "path"),
    (("route", 0, "health", "interval"), "interval"),
    (("route", 1, "dialect"), "dialect"),
    (("route", 1, "balance"), "balance"),
    (("route", 2, "idle_timeout"), "idle_timeout"),
    (("route", 2, "breaker", "reset_timeout"), "reset_timeout"),
    (("route", 2, "protocol"), "protocol"),
]


def test_the_base_config_loads(workdir) -> None:
    path = workdir / "base.toml"
    path.write_text(tomlDocument(BASE))
    config = load(path)
    assert isinstance(config, Config), config
    assert [r.name for r in config.routes] == ["web", "cache", "db"]


def setAt(document: Any, where: tuple[Any, ...], value: Any) -> Any:
    copy = json.loads(json.dumps(document))
    node = copy
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    return copy


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TARGETS), st.one_of(anyValue, durations, sizes, endpoints, members))
@example(TARGETS[2], 10**400)
@example(TARGETS[10], "9" * 400)
def test_one_bad_value_is_refused_naming_its_key(workdir, target, value) -> None:
    where, key = target
    document = setAt(BASE, where, value)
    text = tomlDocument(document)
    assert same(tomllib.loads(text), document)
    path = workdir / "mutated.toml"
    path.write_text(text)
    outcome = load(path)
    if isinstance(outcome, ConfigError):
        checkMessages(outcome, str(path))
        for message in outcome.errors:
            assert key in message, f"{where} = {value!r} gave an error that does not name {key!r}: {message}"


# --- --route strings -----------------------------------------------------------------

words = st.one_of(
    st.sampled_from(["http", "tcp", "line", "line:redis", "line:memcached", "line:bogus", "tcp:redis",
                     "http:x", "udp", "tcp:0", "tcp:127.0.0.1:1", "unix:/tmp/fuzz.sock", "dns:h.internal:80",
                     "tcp:0:interface=0.0.0.0", ":", "::", "tcp:notaport", "srv:", "\t"]),
    st.text(max_size=12),
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(words, max_size=5).map(" ".join), min_size=1, max_size=3))
@example(["line:redis tcp:0 tcp:127.0.0.1:1"])
@example(["http tcp:0 tcp:127.0.0.1:1", "http tcp:0 tcp:127.0.0.1:1"])
@example([":redis tcp:0 tcp:127.0.0.1:1"])
def test_route_strings_load_or_name_the_route(specs) -> None:
    outcome = load(None, tuple(specs))  # type: ignore[arg-type]
    if isinstance(outcome, ConfigError):
        checkMessages(outcome, "--route")
    else:
        assert len(outcome.routes) == len(specs)
