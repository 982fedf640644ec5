"""The configuration: TOML file and ``--route`` options -> frozen, validated routes.

Everything is parsed and checked once, here; the hot path only reads attributes of
the frozen objects built below.  Validation collects *every* error, each naming the
file, the route and the key, so that one run of ``python -m ambassador check`` tells
ops everything that is wrong (SPEC §2).
"""

from __future__ import annotations

import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs

from ambassador.endpoints import (
    EndpointError,
    checkClientEndpoint,
    listenKey,
    normalizeListen,
)
from ambassador.units import formatDuration, parseDuration, parseSize

DEFAULT_ADMIN = "tcp:9901:interface=127.0.0.1"
BALANCES = ("round_robin", "least_request", "random", "hash")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(Exception):
    """The configuration is refused; ``errors`` holds one message per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@attrs.frozen
class RetryPolicy:
    attempts: int = 3
    backoffBase: float = 0.05
    backoffMax: float = 2.0
    budgetRatio: float = 0.2
    budgetMinPerSecond: float = 10.0


@attrs.frozen
class BreakerPolicy:
    failureThreshold: int = 5
    resetTimeout: float = 10.0
    halfOpenMax: int = 1


@attrs.frozen
class HealthPolicy:
    interval: float = 5.0
    timeout: float = 1.0
    unhealthyThreshold: int = 2
    healthyThreshold: int = 2
    path: str = "/health"
    expectStatus: int = 200


@attrs.frozen
class TLSPolicy:
    serverName: str | None = None
    trustRoots: str | None = None
    certificate: str | None = None
    privateKey: str | None = None


@attrs.frozen
class DNSConfig:
    servers: tuple[tuple[str, int], ...] = ()
    refresh: float = 30.0


@attrs.frozen
class Route:
    """One route: a listener, its protocol, its members and its resilience policies."""

    name: str
    protocol: str
    listen: str
    upstreams: tuple[str, ...]
    connectTimeout: float = 2.0
    timeout: float = 5.0
    deadline: float = 15.0
    idleTimeout: float = 300.0
    headerTimeout: float = 10.0
    maxConnections: int = 1024
    drainTimeout: float = 10.0
    balance: str = "round_robin"
    accessLog: bool = True
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    health: HealthPolicy | None = None
    tls: TLSPolicy | None = None
    options: Mapping[str, Any] = attrs.field(factory=lambda: MappingProxyType({}))
    #: A digest of the contents of every certificate, key and CA file the route reads
    #: ([route.tls] and tls: members): a rotated file makes the route differ, so a
    #: SIGHUP reload re-reads it (SPEC §7, issue 6) without a restart.
    tlsFingerprint: str | None = None

    def summary(self) -> str:
        """The one line ``check`` prints for this route."""
        members = ", ".join(self.upstreams)
        return (
            f'route "{self.name}": {self.protocol} on {self.listen} -> {members} '
            f"({self.balance}, {self.retry.attempts} attempts, "
            f"timeout {formatDuration(self.timeout)}, deadline {formatDuration(self.deadline)})"
        )


@attrs.frozen
class Config:
    source: str | None
    admin: str | None
    dns: DNSConfig
    routes: tuple[Route, ...]


# --- value parsers --------------------------------------------------------------------


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}, not {value}")
        return value

    return parse


def _number(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {value!r}")
        if isinstance(value, int) and value > 2**53:
            raise ValueError(f"must be a number up to {2**53}, not {value}")
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"must be a number >= {minimum}, not {value}")
        return float(value)

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, not {value!r}")
    return value


def _balance(value: Any) -> str:
    if value not in BALANCES:
        raise ValueError(f"must be one of {', '.join(BALANCES)}, not {value!r}")
    return str(value)


def _path(value: Any) -> str:
    text = _str(value)
    if not os.path.exists(text):
        raise ValueError(f"{text!r} does not exist")
    if not os.access(text, os.R_OK):
        raise ValueError(f"{text!r} is not readable")
    return text


def _httpPath(value: Any) -> str:
    text = _str(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', not {text!r}")
    return text


def _dnsServer(value: Any) -> tuple[str, int]:
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if not sep or (text.count(":") > 1 and not text.startswith("[")):
        return (text, 53)  # a host, or a bare IPv6 address ("::1"; with a port: "[::1]:53")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST or HOST:PORT")
    return (host.strip("[]"), int(port))


# Keys every route has, with the attribute of Route they set.
_COMMON: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "connect_timeout": ("connectTimeout", parseDuration),
    "timeout": ("timeout", parseDuration),
    "deadline": ("deadline", parseDuration),
    "idle_timeout": ("idleTimeout", parseDuration),
    "header_timeout": ("headerTimeout", parseDuration),
    "max_connections": ("maxConnections", _int(1)),
    "drain_timeout": ("drainTimeout", parseDuration),
    "balance": ("balance", _balance),
    "access_log": ("accessLog", _bool),
}

_TABLES: dict[str, tuple[type, dict[str, tuple[str, Callable[[Any], Any]]]]] = {
    "retry": (
        RetryPolicy,
        {
            "attempts": ("attempts", _int(1, 100)),
            "backoff_base": ("backoffBase", parseDuration),
            "backoff_max": ("backoffMax", parseDuration),
            "budget_ratio": ("budgetRatio", _number(0.0)),
            "budget_min_per_second": ("budgetMinPerSecond", _number(0.0)),
        },
    ),
    "breaker": (
        BreakerPolicy,
        {
            "failure_threshold": ("failureThreshold", _int(1)),
            "reset_timeout": ("resetTimeout", parseDuration),
            "half_open_max": ("halfOpenMax", _int(1)),
        },
    ),
    "health": (
        HealthPolicy,
        {
            "interval": ("interval", parseDuration),
            "timeout": ("timeout", parseDuration),
            "unhealthy_threshold": ("unhealthyThreshold", _int(1)),
            "healthy_threshold": ("healthyThreshold", _int(1)),
            "path": ("path", _httpPath),
            "expect_status": ("expectStatus", _int(100, 599)),
        },
    ),
    "tls": (
        TLSPolicy,
        {
            "server_name": ("serverName", _str),
            "trust_roots": ("trustRoots", _path),
            "certificate": ("certificate", _path),
            "private_key": ("privateKey", _path),
        },
    ),
}

# Tables a route inherits from [defaults] (tls is per route: it names one service).
_INHERITED_TABLES = ("retry", "breaker", "health")


def loadProtocols() -> dict[str, Any]:
    """Every installed route protocol plugin, by name (SPEC §9)."""
    from twisted.plugin import getPlugins

    import twisted.plugins
    from ambassador.interfaces import IRouteProtocol

    return {plugin.name: plugin for plugin in getPlugins(IRouteProtocol, twisted.plugins)}


class _Errors:
    """Collects messages that all start with the config's source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []

    def add(self, where: str | None, key: str | None, message: str) -> None:
        parts = [self.source]
        if where:
            parts.append(where)
        if key is not None:  # (an empty key too: TOML allows "" = 1)
            parts.append(f'key "{key}"')
        parts.append(message)
        self.messages.append(": ".join(parts))


def _parseTable(
    errors: _Errors, where: str | None, prefix: str, table: Any,
    schema: dict[str, tuple[str, Callable[[Any], Any]]],
) -> dict[str, Any]:
    """Parse the known keys of a TOML table into attribute values; report the rest."""
    if not isinstance(table, dict):
        errors.add(where, prefix.rstrip("."), f"must be a table, not {table!r}")
        return {}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in schema:
            errors.add(where, prefix + key, f"unknown key (known: {', '.join(sorted(schema))})")
            continue
        attribute, parse = schema[key]
        try:
            values[attribute] = parse(raw)
        except ValueError as e:
            errors.add(where, prefix + key, str(e))
    return values


def _splitDefaults(errors: _Errors, raw: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        errors.add(None, "defaults", "must be a table")
        return {}, {}
    scalars = {k: v for k, v in raw.items() if k not in _INHERITED_TABLES}
    common = _parseTable(errors, None, "defaults.", scalars, _COMMON)
    tables = {}
    for name in _INHERITED_TABLES:
        if name in raw:
            tables[name] = _parseTable(errors, None, f"defaults.{name}.", raw[name], _TABLES[name][1])
    return common, tables


def _parseRoute(
    errors: _Errors, index: int, raw: Any, where: str,
    common: dict[str, Any], tables: dict[str, dict[str, Any]],
    protocols: Mapping[str, Any],
) -> Route | None:
    if not isinstance(raw, dict):
        errors.add(where, None, "must be a table")
        return None
    before = len(errors.messages)
    raw = dict(raw)
    name = raw.pop("name", None)
    protocolName = raw.pop("protocol", None)
    plugin = None
    if protocolName is None:
        errors.add(where, "protocol", "is required")
    elif not isinstance(protocolName, str) or protocolName not in protocols:
        errors.add(
            where, "protocol",
            f"unknown protocol {protocolName!r} (installed: {', '.join(sorted(protocols))})",
        )
    else:
        plugin = protocols[protocolName]
    if not (isinstance(name, str) and _NAME.match(name)):
        name = f"{protocolName if isinstance(protocolName, str) else 'route'}-{index}"

    values: dict[str, Any] = dict(common)
    listen = raw.pop("listen", None)
    if listen is None:
        errors.add(where, "listen", "is required")
    else:
        try:
            values["listen"] = normalizeListen(_str(listen))
        except (ValueError, EndpointError) as e:
            errors.add(where, "listen", str(e))

    upstreams = raw.pop("upstreams", None)
    if upstreams is None:
        errors.add(where, "upstreams", "is required")
    elif not isinstance(upstreams, list) or not all(isinstance(u, str) for u in upstreams):
        errors.add(where, "upstreams", "must be a list of endpoint strings")
    elif not upstreams:
        errors.add(where, "upstreams", "must name at least one member")
    else:
        for i, member in enumerate(upstreams):
            try:
                checkClientEndpoint(member)
            except EndpointError as e:
                errors.add(where, f"upstreams[{i + 1}]", str(e))
        if len(set(upstreams)) != len(upstreams):
            errors.add(where, "upstreams", "names a member twice")
        values["upstreams"] = tuple(upstreams)

    pluginOptions = {o.name: o for o in (plugin.options if plugin is not None else ())}
    options = {o.name: o.default for o in pluginOptions.values()}
    for key in list(raw):
        if key in _TABLES:
            continue
        value = raw.pop(key)
        if key in _COMMON:
            attribute, parse = _COMMON[key]
            try:
                values[attribute] = parse(value)
            except ValueError as e:
                errors.add(where, key, str(e))
        elif key in pluginOptions:
            try:
                options[key] = pluginOptions[key].parse(value)
            except ValueError as e:
                errors.add(where, key, str(e))
        elif plugin is not None:
            known = sorted([*_COMMON, *pluginOptions, *_TABLES, "name", "protocol", "listen", "upstreams"])
            errors.add(where, key, f"unknown key for a {protocolName} route (known: {', '.join(known)})")
        elif not any(key == o.name for p in protocols.values() for o in p.options):
            # Unknown protocol: still report what no protocol knows, all in this run.
            errors.add(where, key, "unknown key (no installed protocol has it)")
    for tableName, (policyType, schema) in _TABLES.items():
        inherited = tables.get(tableName)
        own = raw.get(tableName)
        if inherited is None and own is None:
            continue
        merged = dict(inherited or {})
        if own is not None:
            merged.update(_parseTable(errors, where, f"{tableName}.", own, schema))
        try:
            values[tableName] = policyType(**merged)
        except TypeError as e:  # pragma: no cover - schema and classes agree
            errors.add(where, tableName, str(e))
    values["options"] = MappingProxyType(options)

    retry = values.get("retry", RetryPolicy())
    if retry.backoffBase > retry.backoffMax:
        errors.add(where, "retry.backoff_base", "must not exceed retry.backoff_max")
    tls = values.get("tls")
    if tls is not None and (tls.certificate is None) != (tls.privateKey is None):
        errors.add(where, "tls.certificate", "certificate and private_key go together")
    elif tls is not None:
        _checkTLS(errors, where, tls, values.get("upstreams", ()))
    if values.get("balance") == "hash" and plugin is not None and not plugin.keyHashing:
        errors.add(where, "balance", f'"hash" needs requests with keys (line routes), not {protocolName}')
    if len(errors.messages) != before:
        return None
    values["tlsFingerprint"] = _tlsFingerprint(values.get("tls"), values.get("upstreams", ()))
    route = Route(name=name, protocol=protocolName, **values)
    for key, message in plugin.validate(route) if plugin is not None else ():
        errors.add(where, key, message)
    return route if len(errors.messages) == before else None


def _checkTLS(errors: _Errors, where: str, tls: TLSPolicy, upstreams: Sequence[str]) -> None:
    """``[route.tls]``: files that parse, a key that matches its certificate, members
    it can wrap (SPEC §2; the contents are checked here so that a bad file stops the
    process before anything binds, not at the first connection)."""
    from ambassador.tls import TLSFileError, loadCertificates, loadPrivateCertificate
    from ambassador.upstream import isTLSMember, tlsServerName

    if tls.trustRoots is not None:
        try:
            loadCertificates(tls.trustRoots, "trust_roots")
        except TLSFileError as e:
            errors.add(where, "tls.trust_roots", str(e))
    if tls.certificate is not None:
        try:
            loadPrivateCertificate(tls.certificate, tls.privateKey)
        except TLSFileError as e:
            key = "tls.private_key" if "private key" in str(e) else "tls.certificate"
            errors.add(where, key, str(e))
    for i, member in enumerate(upstreams):
        try:
            checkClientEndpoint(member)
        except EndpointError:
            continue  # reported as upstreams[N] already
        if isTLSMember(member):
            errors.add(
                where, "tls",
                f"member {member!r} (upstreams[{i + 1}]) already speaks TLS; [route.tls] would "
                "wrap it twice: use a tcp: member with [route.tls], or the tls: string's own "
                "trustRoots=/certificate=/privateKey=",
            )
        elif tlsServerName(member, tls) is None and not member.startswith("srv:"):
            # (a srv: member's certificate is verified against its SRV target's name)
            errors.add(
                where, "tls.server_name",
                f"is required: member {member!r} (upstreams[{i + 1}]) has no host name to verify",
            )


def _tlsFingerprint(tls: TLSPolicy | None, upstreams: Sequence[str]) -> str | None:
    """sha256 over the TLS files a route reads, or None when it reads none."""
    import hashlib

    from twisted.internet.endpoints import _parse

    paths: list[str] = []
    if tls is not None:
        paths += [p for p in (tls.trustRoots, tls.certificate, tls.privateKey) if p]
    for member in upstreams:
        if member.startswith("tls:"):
            _, kwargs = _parse(member)
            paths += [kwargs[k] for k in ("trustRoots", "certificate", "privateKey") if k in kwargs]
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        files = [path]
        if os.path.isdir(path):
            files = sorted(os.path.join(path, name) for name in os.listdir(path))
        for name in files:
            digest.update(name.encode() + b"\0")
            try:
                with open(name, "rb") as f:
                    digest.update(f.read())
            except OSError:
                digest.update(b"unreadable")
    return digest.hexdigest()


def parseRouteSpec(spec: str, protocols: Mapping[str, Any]) -> dict[str, Any]:
    """``PROTOCOL[:DIALECT] LISTEN UPSTREAM [UPSTREAM ...]`` -> a raw route table."""
    words = spec.split()
    if len(words) < 3:
        raise ValueError(
            f"{spec!r} is not 'PROTOCOL[:DIALECT] LISTEN UPSTREAM [UPSTREAM ...]'"
        )
    protocolName, _, dialect = words[0].partition(":")
    raw: dict[str, Any] = {"protocol": protocolName, "listen": words[1], "upstreams": words[2:]}
    if dialect:
        plugin = protocols.get(protocolName)
        option = getattr(plugin, "dialectOption", None) if plugin is not None else None
        if plugin is not None and option is None:
            raise ValueError(f"protocol {protocolName!r} has no dialects (in {spec!r})")
        raw[option or "dialect"] = dialect
    return raw


def loadConfig(
    path: str | None,
    routeSpecs: Iterable[str] = (),
    admin: str | None = None,
    protocols: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the config file and the ``--route`` options.

    @param admin: the ``--admin`` option, which overrides ``[admin] listen``.
    @raise ConfigError: with every problem found.
    """
    if protocols is None:
        protocols = loadProtocols()
    routeSpecs = list(routeSpecs)
    source = path if path is not None else "--route"
    errors = _Errors(source)
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8
            raise ConfigError([f"{path}: not valid TOML: {e}"]) from None

    for key in document:
        if key not in ("admin", "dns", "defaults", "route"):
            errors.add(None, key, "unknown key (known: admin, defaults, dns, route)")

    adminListen: str | None = DEFAULT_ADMIN
    adminTable = document.get("admin", {})
    if not isinstance(adminTable, dict):
        errors.add(None, "admin", "must be a table")
    else:
        for key in adminTable:
            if key != "listen":
                errors.add(None, f"admin.{key}", "unknown key (known: listen)")
        if "listen" in adminTable:
            adminListen = adminTable["listen"]
    if admin is not None:
        adminListen = admin
    if adminListen is not None and adminListen != "none":
        try:
            adminListen = normalizeListen(_str(adminListen))
        except (ValueError, EndpointError) as e:
            errors.add(None, "admin.listen" if admin is None else "--admin", str(e))
    else:
        adminListen = None

    dns = DNSConfig()
    if "dns" in document:
        dnsValues = _parseTable(errors, None, "dns.", document["dns"], {
            "servers": ("servers", lambda v: _list(v, _dnsServer)),
            "refresh": ("refresh", parseDuration),
        })
        dns = DNSConfig(**dnsValues)

    common, tables = _splitDefaults(errors, document.get("defaults"))

    rawRoutes = document.get("route", [])
    if not isinstance(rawRoutes, list):
        errors.add(None, "route", "must be an array of tables ([[route]])")
        rawRoutes = []
    candidates: list[tuple[str, int, Any]] = [("route", i + 1, r) for i, r in enumerate(rawRoutes)]
    for i, spec in enumerate(routeSpecs):
        try:
            candidates.append(("--route", i + 1, parseRouteSpec(spec, protocols)))
        except ValueError as e:
            errors.add(f"--route[{i + 1}]", None, str(e))

    routes: list[Route] = []
    seenNames: dict[str, str] = {}
    seenListens: dict[Any, str] = {}
    for label, index, raw in candidates:
        where = f"{label}[{index}]"
        if isinstance(raw, dict):
            name = raw.get("name")
            if label == "--route":
                raw = {**raw, "name": f"{raw['protocol']}-{index}"}
                where = f'route "{raw["name"]}" (--route {index})'
            elif isinstance(name, str) and _NAME.match(name):
                where = f'route "{name}"'
            elif name is not None:
                errors.add(where, "name", f"{name!r} is not a valid name ([A-Za-z0-9_.-]+)")
        errorSource = errors.source
        if label == "--route":
            errors.source = "--route"
        route = _parseRoute(errors, index, raw, where, common, tables, protocols)
        errors.source = errorSource
        # A route with other errors still claims its name and listen endpoint, so
        # that a clash with it is reported in this same run, not the next one.
        claimed, listen = (route.name, route.listen) if route is not None else _claims(raw, index)
        if claimed is not None and claimed in seenNames:
            errors.add(where, "name", f'duplicate route name "{claimed}" (also {seenNames[claimed]})')
        elif claimed is not None:
            seenNames[claimed] = where
        bound: Any = listenKey(listen) if listen is not None else None
        if isinstance(bound, tuple) and bound[:2] in (("tcp", "0"), ("tcp6", "0")):
            bound = None  # port 0: the OS gives each listener a port of its own
        if bound is not None and bound in seenListens:
            errors.add(where, "listen", f"{listen} is also the listen endpoint of {seenListens[bound]}")
        elif bound is not None:
            seenListens[bound] = where
        if route is not None:
            routes.append(route)
    if not candidates and not errors.messages:
        errors.add(None, "route", "no routes: give at least one [[route]] or --route")
    if errors.messages:
        raise ConfigError(errors.messages)
    return Config(source=path, admin=adminListen, dns=dns, routes=tuple(routes))


def _claims(raw: Any, index: int) -> tuple[str | None, str | None]:
    """The name and normalized listen endpoint of a route table that failed validation,
    where they can be told."""
    if not isinstance(raw, dict):
        return None, None
    given, protocolName = raw.get("name"), raw.get("protocol")
    name: str | None = None
    if isinstance(given, str) and _NAME.match(given):
        name = given
    elif given is None and isinstance(protocolName, str):
        name = f"{protocolName}-{index}"
    listen: str | None
    try:
        listen = normalizeListen(_str(raw.get("listen")))
    except (ValueError, EndpointError):
        listen = None
    return name, listen


def _list(value: Any, parse: Callable[[Any], Any]) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list, not {value!r}")
    return tuple(parse(v) for v in value)
