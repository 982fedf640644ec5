"""The ``twistd ambassador`` command line: Options and makeService (SPEC §1)."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from ambassador.config import ConfigError, loadConfig, loadProtocols

LOG_FORMATS = ("text", "json")


class Options(usage.Options):
    synopsis = "[--config PATH] [--route SPEC ...] [options] [-- CMD [ARG ...]]"
    longdesc = (
        "Run the ambassador: an outbound proxy that gives an application's calls to "
        "remote services retries, timeouts, circuit breakers, load balancing and TLS. "
        "Give a TOML config file, quick routes, or both."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["admin", None, None,
         "Admin endpoint (default tcp:9901:interface=127.0.0.1); 'none' turns it off; "
         "overrides [admin] listen."],
        ["log-format", None, "text", "Log format: text or json (one JSON object a line)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["route"] = []
        self["command"] = ()

    def opt_route(self, spec: str) -> None:
        """Quick route 'PROTOCOL[:DIALECT] LISTEN UPSTREAM [UPSTREAM ...]' (repeatable)."""
        self["route"].append(spec)

    opt_r = opt_route

    def parseArgs(self, *command: str) -> None:
        self["command"] = command

    def postOptions(self) -> None:
        if self["config"] is None and not self["route"]:
            raise usage.UsageError("give --config PATH, or at least one --route SPEC")
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")


def _logsToStdout(server: Any) -> bool:
    """Would twistd's own text observer write to stdout (``-n`` without
    ``--logfile``, or ``--logfile=-``) rather than to a file or syslog?"""
    if server is None:
        return False
    try:
        if server["syslog"]:
            return False
        logfile = server["logfile"]
        return bool(logfile == "-" or (server["nodaemon"] and not logfile))
    except KeyError:  # not twistd's ServerOptions
        return False


def makeService(options: Options, reactor: Any = None) -> Any:
    """Build the service tree from the options; exit 1 with every error on bad config."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    from ambassador.logs import jsonObserver, textObserver
    from ambassador.service import AmbassadorService

    protocols = loadProtocols()
    try:
        config = loadConfig(options["config"], options["route"], options["admin"], protocols)
    except ConfigError as e:
        sys.stderr.write("ambassador: the configuration is refused:\n")
        for error in e.errors:
            sys.stderr.write(f"  {error}\n")
        sys.stderr.flush()
        raise SystemExit(1)
    observer: Any = None
    if options["log-format"] == "json":
        observer = jsonObserver(sys.stdout, reactor)
    elif _logsToStdout(getattr(options, "parent", None)):
        # The lines twistd would write, cheaper (ambassador.logs); a log file or
        # syslog stays twistd's own.
        observer = textObserver(sys.stdout, reactor)
    ambassador = AmbassadorService(config, protocols, reactor, logObserver=observer)

    from ambassador.reload import Reloader

    def reloadConfig() -> Any:
        # The same sources as at start: the file is read again, --route/--admin stay.
        return loadConfig(options["config"], options["route"], options["admin"], protocols)

    Reloader(ambassador, reloadConfig, reactor).setServiceParent(ambassador)
    if options["command"]:
        from ambassador.wrapper import Wrapper

        Wrapper(ambassador, options["command"], reactor).setServiceParent(ambassador)
    return ambassador
