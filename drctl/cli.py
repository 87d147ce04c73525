"""The `drctl` command line: one entry point, subcommands per subsystem.

Errors raised on purpose carry their own exit code; they are printed as one line, never as a
traceback. A bad flag is one line too (``drctl: error [usage]: ...``, exit 2). The exit codes
are one table: docs/cli.md, generated from the error classes (``python -m drctl.exitcodes``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from drctl.logsetup import setup_logging
from drctl.memory import tune_malloc
from drctl.words import closest

# gRPC's C core writes its own lines to stderr (a failed TLS handshake with etcd, say), which
# drctl reports as one line of its own. Read when grpc is first imported, so set here, before
# any subcommand imports it; GRPC_VERBOSITY=INFO (or DEBUG) in the environment brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


UNKNOWN_COMMAND = "unknown command "


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or argument reported in one line (not the usage text), and
    a flag this command does not know named first: argparse would otherwise report what is
    missing ("the following arguments are required: --config") and never the typo."""

    _given: list[str] | None = None  # the arguments this (sub)parser was given
    # the parsers of the command line being parsed, outermost first: those still parsing
    # (a subcommand's parser runs inside its parent's), and all of them
    _parsing: ClassVar[list[Parser]] = []
    _used: ClassVar[list[Parser]] = []

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        if not Parser._parsing:
            Parser._used = []
        Parser._parsing.append(self)
        Parser._used.append(self)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            Parser._parsing.pop()

    def error(self, message: str) -> NoReturn:
        chain = Parser._parsing or Parser._used
        unknown = [(parser, arg) for parser in chain for arg in parser.unknown_flags()]
        prog = self.prog
        if message.startswith(UNKNOWN_COMMAND):
            pass  # a misspelt command (_check_value): its flags are unknown to its parent
        elif unknown:
            message = f"unrecognized arguments: {' '.join(arg for _, arg in unknown)}"
            prog = unknown[0][0].prog  # the help of the command that was given it
            for parser, arg in unknown:  # "--rate-limit -5MB/s": a value, not a flag
                said = parser.negative_value(arg)
                if said:
                    message, prog = said, parser.prog
                    break
        elif message.startswith("unrecognized arguments") and chain:
            prog = chain[-1].prog  # extra arguments: the command's help, not drctl's
        self.exit(2, f"drctl: error [usage]: {message} (see: {prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A subcommand that does not exist: named with the one meant, from the choices
        themselves (argparse's own message quotes them differently from one Python to the
        next)."""
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            choices = list(action.choices)
            near = closest(str(value), choices)
            raise argparse.ArgumentError(None, f"{UNKNOWN_COMMAND}{value!r}" + (
                f"; did you mean {near!r}?" if near else f" (commands: {', '.join(choices)})"))
        super()._check_value(action, value)

    def negative_value(self, arg: str) -> str | None:
        """``arg`` looks like a negative value given to the flag before it (argparse reads it
        as a flag of its own): what the flag says of it, or how to pass it. None: not that."""
        given = self._given or []
        if not (len(arg) > 1 and (arg[1].isdigit() or arg[1] == ".")) or arg not in given:
            return None
        at = given.index(arg)
        flag = given[at - 1] if at else ""
        action = self._option_string_actions.get(flag)
        if action is None or action.nargs is not None or action.type is None:
            return None
        convert: Any = action.type
        try:
            convert(arg)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            return f"argument {flag}: {exc}"
        return f"{flag} {arg}: a value starting with '-' reads as a flag: give {flag}={arg}"

    def unknown_flags(self) -> list[str]:
        """The option-like arguments given to this parser (up to its subcommand's name, which
        starts the subcommand's own) that none of its options matches."""
        commands: set[str] = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands.update(action.choices)
        known = self._option_string_actions
        out = []
        for arg in self._given or []:
            if arg == "--" or arg in commands:
                break
            if not arg.startswith("-") or arg == "-" or (
                    self._negative_number_matcher.match(arg)
                    and not self._has_negative_number_optionals):
                continue
            flag = arg.split("=", 1)[0]
            if flag in known or (not flag.startswith("--") and flag[:2] in known):
                continue  # -xVALUE
            if self.allow_abbrev and flag.startswith("--") and any(
                    option.startswith(flag) for option in known):
                continue
            out.append(arg)
        return out


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("drctl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from drctl import certs_cli, deploy
    from failover import cli as failover_cli
    from replicator import cli as replicate_cli
    from runbooks import cli as runbook_cli
    from sites import cli as sites_cli

    parser: argparse.ArgumentParser = Parser(prog="drctl",
                                             description="DR replication and failover")
    parser.add_argument("--version", action="version", version=f"drctl {version()}")
    parser.add_argument("--log-level", default=os.environ.get("DRCTL_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replicate_cli.add_parser(sub)
    failover_cli.add_parsers(sub)
    sites_cli.add_parser(sub)
    runbook_cli.add_parser(sub)
    certs_cli.add_parser(sub)
    deploy.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from failover.errors import FailoverError  # light: no third-party imports
    from replicator.errors import ReplicatorError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    tune_malloc()
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, so a reader gone early (`| head`) is caught below
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket's, not the reader's: a bug to see
        # the reader of stdout went away: nothing more to say to anyone. Point stdout at
        # /dev/null so the interpreter's last flush does not complain at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except (ReplicatorError, FailoverError) as exc:
        print(f"drctl: error [{exc.code}]: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        # certificates and keys (drctl/pki.py): only raised once that module is loaded, so
        # commands that never touch one do not import cryptography for this clause
        pki = sys.modules.get("drctl.pki")
        if pki is None or not isinstance(exc, pki.PkiError):
            raise
        print(f"drctl: error [{exc.code}]: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    return code


def _stdout_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (its write end reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
