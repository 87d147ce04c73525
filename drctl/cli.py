"""The `drctl` command line: one entry point, subcommands per subsystem.

Errors raised on purpose carry their own exit code; they are printed as one line, never as a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from drctl.logsetup import setup_logging


def build_parser() -> argparse.ArgumentParser:
    from failover import cli as failover_cli
    from replicator import cli as replicate_cli
    from runbooks import cli as runbook_cli
    from sites import cli as sites_cli

    parser = argparse.ArgumentParser(prog="drctl", description="DR replication and failover")
    parser.add_argument("--log-level", default=os.environ.get("DRCTL_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replicate_cli.add_parser(sub)
    failover_cli.add_parsers(sub)
    sites_cli.add_parser(sub)
    runbook_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from failover.errors import FailoverError  # light: no third-party imports
    from replicator.errors import ReplicatorError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except (ReplicatorError, FailoverError) as exc:
        print(f"drctl: error [{exc.code}]: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
