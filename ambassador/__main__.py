"""``python -m ambassador check --config PATH [--route SPEC ...]`` (SPEC §1).

Validates without binding anything: exit 0 and a one-line summary per route, or
exit 1 and every error found.
"""

from __future__ import annotations

import argparse
import sys

from ambassador.config import ConfigError, loadConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambassador")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a configuration without binding anything")
    check.add_argument("-c", "--config", help="TOML configuration file")
    check.add_argument("-r", "--route", action="append", default=[], help="a quick route SPEC")
    check.add_argument("--admin", help="admin endpoint, as for twistd ambassador")
    args = parser.parse_args(argv)
    if args.config is None and not args.route:
        parser.error("check needs --config PATH or --route SPEC")
    try:
        config = loadConfig(args.config, args.route, args.admin)
    except ConfigError as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return 1
    for route in config.routes:
        print(route.summary())
    print(f"admin: {config.admin or 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
