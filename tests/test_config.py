"""The configuration contract (SPEC §2): what a TOML file and ``--route`` options
become, and every kind of bad configuration refused with file, route and key named.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ambassador.config import ConfigError, loadConfig, loadProtocols
from ambassador.interfaces import IRouteProtocol, RouteOption
from ambassador.protocols.tcp import tcpProtocol

WEB = """
[[route]]
name = "web"
protocol = "tcp"
listen = "tcp:18080"
upstreams = ["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]
"""


def _write(tmp_path, text: str, name: str = "ambassador.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, text: str | None, routes=(), protocols=None, admin=None):
    path = _write(tmp_path, text) if text is not None else None
    return loadConfig(str(path) if path else None, routes, admin=admin, protocols=protocols)


def refused(tmp_path, text: str | None, routes=(), protocols=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, routes, protocols)
    assert info.value.errors, "a refused config must say why"
    return info.value.errors


def assertNamed(errors: list[str], source: str, where: str | None, key: str | None) -> None:
    """Some error line names the source, the route and the key (SPEC §2)."""
    for line in errors:
        if (
            line.startswith(f"{source}:")
            and (where is None or f"{where}:" in line)
            and (key is None or f'key "{key}"' in line)
        ):
            return
    raise AssertionError(f"no error names {source} / {where} / {key}: {errors}")


# --- good configurations ------------------------------------------------------------


def test_durations_and_defaults_of_a_minimal_route(tmp_path):
    (route,) = load(tmp_path, WEB).routes
    assert route.name == "web"
    assert route.protocol == "tcp"
    assert route.upstreams == ("tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001")
    # SPEC §2's documented defaults.
    assert (route.connectTimeout, route.timeout, route.deadline) == (2.0, 5.0, 15.0)
    assert (route.idleTimeout, route.headerTimeout, route.drainTimeout) == (300.0, 10.0, 10.0)
    assert route.maxConnections == 1024
    assert route.balance == "round_robin"
    assert route.accessLog is True
    assert (route.retry.attempts, route.retry.backoffBase, route.retry.backoffMax) == (3, 0.05, 2.0)
    assert (route.retry.budgetRatio, route.retry.budgetMinPerSecond) == (0.2, 10.0)
    assert (route.breaker.failureThreshold, route.breaker.resetTimeout) == (5, 10.0)
    assert route.breaker.halfOpenMax == 1
    assert route.health is None and route.tls is None


def test_durations_with_units_and_plain_seconds(tmp_path):
    (route,) = load(tmp_path, WEB + """
        connect_timeout = "250ms"
        timeout = 3
        deadline = "1.5m"
        idle_timeout = "2h"
        drain_timeout = 0.5
        [route.retry]
        backoff_base = "10ms"
        backoff_max = "1s"
    """).routes
    assert route.connectTimeout == pytest.approx(0.25)
    assert route.timeout == 3.0
    assert route.deadline == 90.0
    assert route.idleTimeout == 7200.0
    assert route.drainTimeout == 0.5
    assert route.retry.backoffBase == pytest.approx(0.01)
    assert route.retry.backoffMax == 1.0


def test_defaults_are_inherited_and_overridden_per_route(tmp_path):
    config = load(tmp_path, """
        [defaults]
        timeout = "1s"
        deadline = "7s"
        max_connections = 10
        [[route]]
        name = "inherits"
        protocol = "tcp"
        listen = "tcp:18080"
        upstreams = ["tcp:127.0.0.1:9000"]
        [[route]]
        name = "overrides"
        protocol = "tcp"
        listen = "tcp:18081"
        upstreams = ["tcp:127.0.0.1:9000"]
        timeout = "2s"
        access_log = false
    """)
    inherits, overrides = config.routes
    assert (inherits.timeout, inherits.deadline, inherits.maxConnections) == (1.0, 7.0, 10)
    assert (overrides.timeout, overrides.deadline, overrides.maxConnections) == (2.0, 7.0, 10)
    assert inherits.accessLog is True and overrides.accessLog is False


def test_default_tables_merge_key_by_key_with_the_route_tables(tmp_path):
    (route,) = load(tmp_path, """
        [defaults.retry]
        attempts = 5
        backoff_base = "20ms"
        budget_ratio = 0.5
        [defaults.breaker]
        failure_threshold = 2
        reset_timeout = "30s"
        [[route]]
        name = "web"
        protocol = "tcp"
        listen = "tcp:18080"
        upstreams = ["tcp:127.0.0.1:9000"]
        [route.retry]
        attempts = 2
        [route.breaker]
        half_open_max = 3
    """).routes
    # The route's own key wins; the other defaults.retry keys stay; the rest are built in.
    assert route.retry.attempts == 2
    assert route.retry.backoffBase == pytest.approx(0.02)
    assert route.retry.budgetRatio == 0.5
    assert route.retry.backoffMax == 2.0
    assert route.breaker.failureThreshold == 2
    assert route.breaker.resetTimeout == 30.0
    assert route.breaker.halfOpenMax == 3


def test_defaults_health_table_is_inherited(tmp_path):
    (route,) = load(tmp_path, """
        [defaults.health]
        interval = "2s"
        [[route]]
        name = "web"
        protocol = "tcp"
        listen = "tcp:18080"
        upstreams = ["tcp:127.0.0.1:9000"]
        [route.health]
        unhealthy_threshold = 4
    """).routes
    assert route.health is not None
    assert (route.health.interval, route.health.unhealthyThreshold) == (2.0, 4)
    assert route.health.timeout == 1.0


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("tcp:18080", "tcp:18080:interface=127.0.0.1"),
        ("tcp:port=18080", "tcp:port=18080:interface=127.0.0.1"),
        ("tcp6:18080", "tcp6:18080:interface=\\:\\:1"),
        ("tcp:18080:interface=0.0.0.0", "tcp:18080:interface=0.0.0.0"),
        ("tcp6:18080:interface=\\:\\:", "tcp6:18080:interface=\\:\\:"),
        ("unix:/tmp/ambassador-test.sock", "unix:/tmp/ambassador-test.sock"),
    ],
)
def test_listen_endpoints_bind_loopback_unless_told_otherwise(tmp_path, listen, expected):
    text = WEB.replace('"tcp:18080"', f'"{listen}"'.replace("\\", "\\\\"))
    (route,) = load(tmp_path, text).routes
    assert route.listen == expected


def test_admin_listen_defaults_to_loopback_and_option_overrides(tmp_path):
    assert load(tmp_path, WEB).admin == "tcp:9901:interface=127.0.0.1"
    withTable = WEB + '\n[admin]\nlisten = "tcp:9911"\n'
    assert load(tmp_path, withTable).admin == "tcp:9911:interface=127.0.0.1"
    assert load(tmp_path, withTable, admin="tcp:9912").admin == "tcp:9912:interface=127.0.0.1"
    assert load(tmp_path, withTable, admin="none").admin is None


def test_route_options_are_merged_with_the_file_and_named_protocol_n(tmp_path):
    config = load(tmp_path, WEB, routes=[
        "tcp tcp:18090 tcp:127.0.0.1:9100",
        "tcp  tcp:18091   tcp:127.0.0.1:9101 tcp:127.0.0.1:9102",
    ])
    assert [r.name for r in config.routes] == ["web", "tcp-1", "tcp-2"]
    second = config.routes[2]
    assert second.listen == "tcp:18091:interface=127.0.0.1"
    assert second.upstreams == ("tcp:127.0.0.1:9101", "tcp:127.0.0.1:9102")


def test_defaults_of_the_file_apply_to_route_options(tmp_path):
    config = load(tmp_path, """
        [defaults]
        timeout = "1s"
        [defaults.retry]
        attempts = 7
    """, routes=["tcp tcp:18090 tcp:127.0.0.1:9100"])
    (route,) = config.routes
    assert route.name == "tcp-1"
    assert route.timeout == 1.0
    assert route.retry.attempts == 7


def test_route_options_alone_need_no_file(tmp_path):
    config = load(tmp_path, None, routes=["tcp tcp:18090 tcp:127.0.0.1:9100"])
    assert config.source is None
    assert [r.name for r in config.routes] == ["tcp-1"]


def test_installed_protocols_provide_the_interface():
    protocols = loadProtocols()
    assert "tcp" in protocols
    for plugin in protocols.values():
        assert verifyObject(IRouteProtocol, plugin)


# --- bad configurations -------------------------------------------------------------

ROUTE_B = """
[[route]]
name = "b"
protocol = "tcp"
listen = "tcp:18081"
upstreams = ["tcp:127.0.0.1:9000"]
"""

# (id, TOML, the route as named in the message or None for top level, the key)
BAD = [
    # unknown keys (typos) at every level
    ("typo-top-level", "[defualts]\ntimeout = 1\n" + WEB, None, "defualts"),
    ("typo-in-defaults", "[defaults]\ntimout = 1\n" + WEB, None, "defaults.timout"),
    ("typo-in-defaults-retry", "[defaults.retry]\nattempt = 2\n" + WEB, None, "defaults.retry.attempt"),
    ("typo-in-defaults-breaker", "[defaults.breaker]\nthreshold = 2\n" + WEB, None,
     "defaults.breaker.threshold"),
    ("tls-in-defaults", "[defaults.tls]\nserver_name = 'x'\n" + WEB, None, "defaults.tls"),
    ("typo-in-admin", WEB + "[admin]\nlisten_on = 'tcp:9901'\n", None, "admin.listen_on"),
    ("typo-in-dns", WEB + "[dns]\nserver = ['127.0.0.1']\n", None, "dns.server"),
    ("typo-in-route", WEB + 'idel_timeout = "5s"\n', 'route "web"', "idel_timeout"),
    ("typo-in-route-retry", WEB + "[route.retry]\nattempt = 2\n", 'route "web"', "retry.attempt"),
    ("typo-in-route-breaker", WEB + "[route.breaker]\nfailure_treshold = 2\n", 'route "web"',
     "breaker.failure_treshold"),
    ("typo-in-route-health", WEB + "[route.health]\nintervall = '1s'\n", 'route "web"',
     "health.intervall"),
    ("typo-in-route-tls", WEB + "[route.tls]\nservername = 'x'\n", 'route "web"', "tls.servername"),
    # wrong types
    ("timeout-bool", WEB + "timeout = true\n", 'route "web"', "timeout"),
    ("max-connections-string", WEB + 'max_connections = "10"\n', 'route "web"', "max_connections"),
    ("max-connections-zero", WEB + "max_connections = 0\n", 'route "web"', "max_connections"),
    ("access-log-string", WEB + 'access_log = "yes"\n', 'route "web"', "access_log"),
    ("balance-number", WEB + "balance = 3\n", 'route "web"', "balance"),
    ("balance-unknown", WEB + 'balance = "fastest"\n', 'route "web"', "balance"),
    ("retry-attempts-string", WEB + '[route.retry]\nattempts = "3"\n', 'route "web"', "retry.attempts"),
    ("retry-attempts-zero", WEB + "[route.retry]\nattempts = 0\n", 'route "web"', "retry.attempts"),
    ("budget-ratio-string", WEB + '[route.retry]\nbudget_ratio = "x"\n', 'route "web"',
     "retry.budget_ratio"),
    ("budget-ratio-negative", WEB + "[route.retry]\nbudget_ratio = -0.1\n", 'route "web"',
     "retry.budget_ratio"),
    ("retry-not-a-table", WEB + "retry = 3\n", 'route "web"', "retry"),
    ("defaults-retry-not-a-table", "[defaults]\nretry = 3\n" + WEB, None, "defaults.retry"),
    ("upstreams-string", WEB.replace('["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]', '"tcp:h:1"'),
     'route "web"', "upstreams"),
    ("upstreams-numbers", WEB.replace('["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]', "[1, 2]"),
     'route "web"', "upstreams"),
    ("listen-number", WEB.replace('"tcp:18080"', "18080"), 'route "web"', "listen"),
    ("health-path-relative", WEB + "[route.health]\npath = 'health'\n", 'route "web"', "health.path"),
    ("health-status-range", WEB + "[route.health]\nexpect_status = 700\n", 'route "web"',
     "health.expect_status"),
    ("route-not-array", "route = 5\n", None, "route"),
    # unknown protocol
    ("unknown-protocol", WEB.replace('"tcp"\n', '"htp"\n', 1), 'route "web"', "protocol"),
    ("protocol-not-a-string", WEB.replace('protocol = "tcp"', 'protocol = ["tcp"]'), 'route "web"',
     "protocol"),
    ("protocol-missing", WEB.replace('protocol = "tcp"\n', ""), 'route "web"', "protocol"),
    # unparsable endpoint strings
    ("listen-unknown-type", WEB.replace('"tcp:18080"', '"tcpx:18080"'), 'route "web"', "listen"),
    ("listen-bad-port", WEB.replace('"tcp:18080"', '"tcp:http"'), 'route "web"', "listen"),
    ("listen-empty", WEB.replace('"tcp:18080"', '""'), 'route "web"', "listen"),
    ("listen-missing", WEB.replace('listen = "tcp:18080"\n', ""), 'route "web"', "listen"),
    ("upstream-unknown-type", WEB.replace('"tcp:127.0.0.1:9001"', '"foo:bar"'), 'route "web"',
     "upstreams[2]"),
    ("upstream-no-port", WEB.replace('"tcp:127.0.0.1:9000"', '"tcp:127.0.0.1"'), 'route "web"',
     "upstreams[1]"),
    ("upstream-bad-port", WEB.replace('"tcp:127.0.0.1:9000"', '"tcp:127.0.0.1:http"'), 'route "web"',
     "upstreams[1]"),
    ("listen-port-out-of-range", WEB.replace('"tcp:18080"', '"tcp:99999"'), 'route "web"', "listen"),
    ("upstream-port-out-of-range", WEB.replace('"tcp:127.0.0.1:9000"', '"tcp:127.0.0.1:70000"'),
     'route "web"', "upstreams[1]"),
    ("admin-listen-bad", WEB + "[admin]\nlisten = 'tcpx:1'\n", None, "admin.listen"),
    # empty upstreams
    ("upstreams-empty", WEB.replace('["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]', "[]"),
     'route "web"', "upstreams"),
    ("upstreams-missing", WEB.replace('upstreams = ["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]\n', ""),
     'route "web"', "upstreams"),
    ("upstreams-twice", WEB.replace('"tcp:127.0.0.1:9001"', '"tcp:127.0.0.1:9000"'), 'route "web"',
     "upstreams"),
    # duplicate route names, given or default
    ("duplicate-given-name", WEB + ROUTE_B.replace('"b"', '"web"'), 'route "web"', "name"),
    ("duplicate-default-name",
     WEB.replace('name = "web"', 'name = "tcp-2"') + ROUTE_B.replace('name = "b"\n', ""),
     "route[2]", "name"),
    # duplicate listen endpoints, however they are spelled
    ("duplicate-listen", WEB + ROUTE_B.replace("tcp:18081", "tcp:18080"), 'route "b"', "listen"),
    ("duplicate-listen-explicit-loopback",
     WEB + ROUTE_B.replace("tcp:18081", "tcp:18080:interface=127.0.0.1"), 'route "b"', "listen"),
    ("duplicate-listen-port-keyword", WEB + ROUTE_B.replace("tcp:18081", "tcp:port=18080"),
     'route "b"', "listen"),
    ("duplicate-listen-unix",
     WEB.replace("tcp:18080", "unix:/tmp/amb-dup.sock") + ROUTE_B.replace("tcp:18081", "unix:/tmp/amb-dup.sock"),
     'route "b"', "listen"),
    # negative or zero durations
    ("timeout-zero", WEB + "timeout = 0\n", 'route "web"', "timeout"),
    ("timeout-negative", WEB + "timeout = -1\n", 'route "web"', "timeout"),
    ("deadline-negative-string", WEB + 'deadline = "-5s"\n', 'route "web"', "deadline"),
    ("connect-timeout-zero-ms", WEB + 'connect_timeout = "0ms"\n', 'route "web"', "connect_timeout"),
    ("idle-timeout-no-unit", WEB + 'idle_timeout = "5"\n', 'route "web"', "idle_timeout"),
    ("drain-timeout-bad-unit", WEB + 'drain_timeout = "5d"\n', 'route "web"', "drain_timeout"),
    ("defaults-deadline-zero", "[defaults]\ndeadline = 0\n" + WEB, None, "defaults.deadline"),
    ("backoff-base-zero", WEB + '[route.retry]\nbackoff_base = "0s"\n', 'route "web"',
     "retry.backoff_base"),
    ("reset-timeout-negative", WEB + "[route.breaker]\nreset_timeout = -10\n", 'route "web"',
     "breaker.reset_timeout"),
    ("health-interval-zero", WEB + "[route.health]\ninterval = 0\n", 'route "web"', "health.interval"),
    ("dns-refresh-zero", WEB + "[dns]\nrefresh = '0s'\n", None, "dns.refresh"),
    ("backoff-base-over-max",
     WEB + '[route.retry]\nbackoff_base = "3s"\nbackoff_max = "1s"\n', 'route "web"',
     "retry.backoff_base"),
    # balance = "hash" outside line routes
    ("hash-on-tcp", WEB + 'balance = "hash"\n', 'route "web"', "balance"),
    ("hash-in-defaults-for-tcp", '[defaults]\nbalance = "hash"\n' + WEB, 'route "web"', "balance"),
    # names: invalid -> route[N]
    ("invalid-name", WEB.replace('"web"', '"web server"'), "route[1]", "name"),
    ("name-not-a-string", WEB.replace('"web"', "5"), "route[1]", "name"),
    # tls: a client certificate needs its key
    ("tls-certificate-without-key", WEB + f"[route.tls]\ncertificate = '{__file__}'\n", 'route "web"',
     "tls.certificate"),
    ("tls-missing-file", WEB + "[route.tls]\ntrust_roots = '/nonexistent/ca'\n", 'route "web"',
     "tls.trust_roots"),
]


@pytest.mark.parametrize("text, where, key", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_refused_naming_file_route_and_key(tmp_path, text, where, key):
    errors = refused(tmp_path, text)
    assertNamed(errors, str(tmp_path / "ambassador.toml"), where, key)


def test_a_route_without_a_name_is_named_by_its_index(tmp_path):
    text = WEB + ROUTE_B.replace('name = "b"\n', "") + "timeout = 0\n"
    errors = refused(tmp_path, text)
    assertNamed(errors, str(tmp_path / "ambassador.toml"), "route[2]", "timeout")


def test_a_route_with_an_invalid_name_reports_its_other_errors_by_index(tmp_path):
    errors = refused(tmp_path, WEB.replace('"web"', '"a/b"') + "timeout = 0\n")
    path = str(tmp_path / "ambassador.toml")
    assertNamed(errors, path, "route[1]", "name")
    assertNamed(errors, path, "route[1]", "timeout")


def test_every_error_of_a_file_is_reported_in_one_go(tmp_path):
    errors = refused(tmp_path, """
        [defaults]
        timout = "1s"
        [[route]]
        name = "web"
        protocol = "tcp"
        listen = "tcpx:1"
        upstreams = []
        idel_timeout = "5m"
        [route.retry]
        attempts = 0
        [[route]]
        name = "b"
        protocol = "htp"
        listen = "tcp:18081"
        upstreams = ["tcp:127.0.0.1:9000"]
        [[route]]
        protocol = "tcp"
        listen = "tcp:18082"
        upstreams = ["tcp:127.0.0.1:9000"]
        deadline = -1
    """)
    path = str(tmp_path / "ambassador.toml")
    assertNamed(errors, path, None, "defaults.timout")
    assertNamed(errors, path, 'route "web"', "listen")
    assertNamed(errors, path, 'route "web"', "upstreams")
    assertNamed(errors, path, 'route "web"', "idel_timeout")
    assertNamed(errors, path, 'route "web"', "retry.attempts")
    assertNamed(errors, path, 'route "b"', "protocol")
    assertNamed(errors, path, "route[3]", "deadline")
    assert len(errors) == 7, errors


def test_a_file_that_is_not_toml_is_refused_naming_it(tmp_path):
    errors = refused(tmp_path, "[[route]\nname = ")
    assert errors[0].startswith(str(tmp_path / "ambassador.toml"))


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        loadConfig(str(tmp_path / "nope.toml"))
    assert str(tmp_path / "nope.toml") in info.value.errors[0]


def test_no_routes_at_all_is_refused(tmp_path):
    errors = refused(tmp_path, "[defaults]\ntimeout = 1\n")
    assertNamed(errors, str(tmp_path / "ambassador.toml"), None, "route")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("tcp tcp:18090", "--route[1]"),
        ("htp tcp:18090 tcp:127.0.0.1:9000", 'route "htp-1"'),
        ("tcp:redis tcp:18090 tcp:127.0.0.1:9000", "--route[1]"),
        ("tcp tcpx:18090 tcp:127.0.0.1:9000", 'route "tcp-1"'),
        ("tcp tcp:18090 tcp:127.0.0.1", 'route "tcp-1"'),
    ],
)
def test_bad_route_option_is_refused_naming_it(tmp_path, spec, fragment):
    errors = refused(tmp_path, None, routes=[spec])
    assert any(line.startswith("--route") and fragment in line for line in errors), errors


def test_route_option_listen_clashing_with_the_file_is_refused(tmp_path):
    errors = refused(tmp_path, WEB, routes=["tcp tcp:18080 tcp:127.0.0.1:9100"])
    assert any('route "tcp-1"' in e and 'key "listen"' in e for e in errors), errors


def test_route_option_name_clashing_with_a_default_file_name_is_refused(tmp_path):
    errors = refused(tmp_path, WEB.replace('name = "web"\n', ""),
                     routes=["tcp tcp:18090 tcp:127.0.0.1:9100"])
    assert any('route "tcp-1"' in e and 'key "name"' in e for e in errors), errors


def test_file_errors_name_the_file_even_with_route_options(tmp_path):
    errors = refused(tmp_path, "[defaults]\ntimeout = 0\n", routes=["tcp tcp:18090 tcp:127.0.0.1:9100"])
    assertNamed(errors, str(tmp_path / "ambassador.toml"), None, "defaults.timeout")


# --- dialects -----------------------------------------------------------------------

DIALECTS = ("line", "redis", "memcached")


def _dialect(value: Any) -> str:
    if value not in DIALECTS:
        raise ValueError(f"unknown dialect {value!r} (known: {', '.join(DIALECTS)})")
    return str(value)


@implementer(IRouteProtocol)
class FakeKeyedProtocol:
    """A protocol with dialects and keyed requests, standing in for ``line`` so the
    loader's handling of plugin options is tested whatever protocols are installed."""

    name = "keyed"
    options = (RouteOption("dialect", _dialect, "line"),)
    dialectOption = "dialect"
    keyHashing = True

    def validate(self, route: Any) -> list[tuple[str, str]]:
        return []

    def buildFactory(self, route: Any, core: Any, reactor: Any) -> Any:
        raise NotImplementedError


FAKES = {"tcp": tcpProtocol, "keyed": FakeKeyedProtocol()}
KEYED = WEB.replace('"tcp"\n', '"keyed"\n', 1)


def test_fake_protocol_provides_the_interface():
    assert verifyObject(IRouteProtocol, FAKES["keyed"])


def test_plugin_options_and_hash_balance_on_a_keyed_protocol(tmp_path):
    (route,) = load(tmp_path, KEYED + 'dialect = "redis"\nbalance = "hash"\n', protocols=FAKES).routes
    assert route.options["dialect"] == "redis"
    assert route.balance == "hash"


def test_plugin_option_default_is_used(tmp_path):
    (route,) = load(tmp_path, KEYED, protocols=FAKES).routes
    assert route.options["dialect"] == "line"


def test_unknown_dialect_is_refused_by_the_plugin_option(tmp_path):
    errors = refused(tmp_path, KEYED + 'dialect = "mongo"\n', protocols=FAKES)
    assertNamed(errors, str(tmp_path / "ambassador.toml"), 'route "web"', "dialect")


def test_plugin_option_on_another_protocol_is_an_unknown_key(tmp_path):
    errors = refused(tmp_path, WEB + 'dialect = "redis"\n', protocols=FAKES)
    assertNamed(errors, str(tmp_path / "ambassador.toml"), 'route "web"', "dialect")


def test_route_option_dialect_sets_the_plugin_option(tmp_path):
    config = load(tmp_path, None, routes=["keyed:memcached tcp:18090 tcp:127.0.0.1:9100"],
                  protocols=FAKES)
    assert config.routes[0].options["dialect"] == "memcached"
    errors = refused(tmp_path, None, routes=["keyed:mongo tcp:18090 tcp:127.0.0.1:9100"],
                     protocols=FAKES)
    assert any('route "keyed-1"' in e and 'key "dialect"' in e for e in errors), errors


def _installedWithDialects() -> list[Any]:
    return [p for p in loadProtocols().values() if p.dialectOption is not None]


@pytest.mark.skipif(not _installedWithDialects(), reason="no installed protocol has dialects yet")
def test_unknown_dialect_of_an_installed_protocol_is_refused(tmp_path):
    for plugin in _installedWithDialects():
        text = WEB.replace('"tcp"\n', f'"{plugin.name}"\n', 1)
        text += f'{plugin.dialectOption} = "no-such-dialect"\n'
        errors = refused(tmp_path, text)
        assertNamed(errors, str(tmp_path / "ambassador.toml"), 'route "web"', plugin.dialectOption)


def test_a_clash_with_a_route_that_has_other_errors_is_reported_in_the_same_run(tmp_path):
    errors = refused(tmp_path, WEB + "timeout = 0\n" + ROUTE_B.replace("tcp:18081", "tcp:18080")
                     + ROUTE_B.replace("tcp:18081", "tcp:18082").replace('"b"', '"web"'))
    path = str(tmp_path / "ambassador.toml")
    assertNamed(errors, path, 'route "web"', "timeout")
    assertNamed(errors, path, 'route "b"', "listen")
    assertNamed(errors, path, 'route "web"', "name")


# --- the line protocol, when installed (SPEC §4/line) --------------------------------

lineInstalled = pytest.mark.skipif("line" not in loadProtocols(), reason="no line protocol installed")
LINE = WEB.replace('"tcp"\n', '"line"\n', 1)


@lineInstalled
@pytest.mark.parametrize("dialect", ["line", "redis", "memcached"])
def test_line_routes_take_a_dialect_and_hash_balance(tmp_path, dialect):
    (route,) = load(tmp_path, LINE + f'dialect = "{dialect}"\nbalance = "hash"\n').routes
    assert (route.protocol, route.options["dialect"], route.balance) == ("line", dialect, "hash")


@lineInstalled
def test_line_dialect_from_a_route_option(tmp_path):
    (route,) = load(tmp_path, None, routes=["line:redis tcp:18090 tcp:127.0.0.1:6379"]).routes
    assert (route.name, route.options["dialect"]) == ("line-1", "redis")


@lineInstalled
@pytest.mark.parametrize("text, routes, where, key", [
    (LINE + 'dialect = "mongo"\n', (), 'route "web"', "dialect"),
    (LINE + "dialect = 3\n", (), 'route "web"', "dialect"),
    (None, ["line:mongo tcp:18090 tcp:127.0.0.1:6379"], 'route "line-1" (--route 1)', "dialect"),
])
def test_unknown_line_dialect_is_refused(tmp_path, text, routes, where, key):
    errors = refused(tmp_path, text, routes)
    source = str(tmp_path / "ambassador.toml") if text is not None else "--route"
    assertNamed(errors, source, where, key)


@pytest.mark.parametrize(
    "name", sorted(n for n, p in loadProtocols().items() if not p.keyHashing),
)
def test_hash_balance_is_refused_for_every_installed_protocol_without_keys(tmp_path, name):
    text = WEB.replace('"tcp"\n', f'"{name}"\n', 1) + 'balance = "hash"\n'
    errors = refused(tmp_path, text)
    assertNamed(errors, str(tmp_path / "ambassador.toml"), 'route "web"', "balance")


def test_listeners_on_port_zero_never_clash(tmp_path):
    # port 0: each gets a free port from the OS (handy in wrapper mode, SPEC §8)
    config = load(tmp_path, None, routes=["tcp tcp:0 tcp:127.0.0.1:9100", "tcp tcp:0 tcp:127.0.0.1:9101"])
    assert [r.listen for r in config.routes] == ["tcp:0:interface=127.0.0.1"] * 2


def test_ssl_listeners_bind_loopback_unless_told_otherwise(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    key, chain = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    listen = f"ssl:18443:privateKey={key}:certKey={chain}"
    (route,) = load(tmp_path, None, routes=[f"tcp {listen} tcp:127.0.0.1:9100"]).routes
    assert route.listen == listen + ":interface=127.0.0.1"


def test_a_route_of_an_unknown_protocol_still_reports_keys_no_protocol_knows(tmp_path):
    errors = refused(tmp_path, WEB.replace('"tcp"\n', '"htp"\n', 1) + 'idel_timeout = "5s"\ndialect = "redis"\n',
                     protocols=FAKES)
    path = str(tmp_path / "ambassador.toml")
    assertNamed(errors, path, 'route "web"', "protocol")
    assertNamed(errors, path, 'route "web"', "idel_timeout")
    # "dialect" belongs to an installed protocol: the route may have meant that one
    assert not any('key "dialect"' in e for e in errors), errors


def test_dns_servers_and_refresh(tmp_path):
    config = load(tmp_path, WEB + '[dns]\nservers = ["127.0.0.1:5353", "10.0.0.2", "[::1]:5300", "::1"]\nrefresh = "1m"\n')
    assert config.dns.servers == (("127.0.0.1", 5353), ("10.0.0.2", 53), ("::1", 5300), ("::1", 53))
    assert config.dns.refresh == 60.0
    assert load(tmp_path, WEB).dns.servers == ()  # default: the system's resolver


@pytest.mark.parametrize("servers", ['"127.0.0.1"', '["127.0.0.1:dns"]', '["127.0.0.1:70000"]', "[53]"])
def test_bad_dns_servers_are_refused(tmp_path, servers):
    errors = refused(tmp_path, WEB + f"[dns]\nservers = {servers}\n")
    assertNamed(errors, str(tmp_path / "ambassador.toml"), None, "dns.servers")


def test_systemd_listeners_are_checked_by_syntax_outside_systemd():
    """Twisted's systemd: parser needs the inherited socket; `check` must work anywhere."""
    from ambassador.endpoints import EndpointError, normalizeListen

    assert normalizeListen("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
    assert normalizeListen("systemd:domain=UNIX:name=cache") == "systemd:domain=UNIX:name=cache"
    for bad in ("systemd:domain=INET", "systemd:domain=IPX:index=0", "systemd:domain=INET:index=x"):
        with pytest.raises(EndpointError):
            normalizeListen(bad)
