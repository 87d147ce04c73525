"""Every drctl command's exit codes, in one table.

Each error class carries its ``exit_code`` (replicator/errors.py, failover/errors.py, ...);
this table says what each code means across commands. docs/cli.md is generated from the
table and the classes: ``python -m drctl.exitcodes > docs/cli.md`` (a test checks that it is
current, that every error class's exit code is in the table, and that errors of one kind
share one code)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class ExitCode:
    code: int
    meaning: str
    examples: tuple[str, ...] = ()


TABLE: tuple[ExitCode, ...] = (
    ExitCode(0, "done (`push --once`: the replica is verified equal to the volume)"),
    ExitCode(1, "a check failed: the replica differs (`verify`), the audit chain does not "
             "verify (`audit verify`), a drill or a health check failed; or another failure "
             "the more specific codes do not name", (
                 "drctl: error [verify_mismatch]: volume db: replica differs: 3 of 256 "
                 "blocks mismatch (first at block 7), sizes 1048576 vs 1048576",
                 "drctl: error [failover_error]: app: another request is still pending")),
    ExitCode(2, "bad flags or arguments, or a configuration error (the same in every "
             "command): a flag's value, a configuration or runbook file that cannot be read "
             "or is invalid, an address this host cannot listen on, a directory that cannot "
             "be used, certificates that cannot be used", (
                 "drctl: error [usage]: argument --interval: expected seconds > 0, got '-1' "
                 "(see: drctl replicate push --help)",
                 "drctl: error [usage]: --listen 127.0.0.1:7400: cannot listen there: "
                 "address already in use (another socket on this host has that port)",
                 "drctl: error [usage]: --dir /srv/x/replicas: no such directory, nor its "
                 "parent /srv/x (create it first)",
                 "drctl: error [config]: cluster.yaml:2: etcd: invalid address "
                 "'http://10.0.0.1:2379': expected HOST:PORT, without a scheme",
                 "notes.yaml:1: not a drctl runbook (no 'kind: drctl-runbook')",
                 "drctl: error [pki]: cannot read CA certificate /etc/drctl/tls/ca.crt: No "
                 "such file or directory")),
    ExitCode(65, "the service's record rules the request out (a failover to a site that "
             "holds no replica, a switchover of a service that is not healthy, a retry of "
             "one that has not failed)", (
                 "drctl: error [invalid_transition]: east is already the primary of app",)),
    ExitCode(66, "no such replica: the target holds no replica of that volume (`verify`, "
             "`fence`; nothing is created)", (
                 "drctl: error [volume_not_found]: target standby:7400: no such replica: "
                 "volume db has no replica on this target (a push creates it)",)),
    ExitCode(69, "unreachable: the replication target or etcd", (
        "drctl: error [target_unavailable]: target standby:7400: no connection within 10s "
        "(failed to connect to all addresses; ... Connection refused)",
        "drctl: error [store_unavailable]: etcd unreachable at 10.0.0.1:2379: ...")),
    ExitCode(70, "an authoritative DNS server refused the signed update"),
    ExitCode(74, "I/O error on the volume, the replica or the agent's state", (
        "drctl: error [volume_io]: cannot open volume /dev/vg0/db: Permission denied",)),
    ExitCode(75, "temporary failure: try again (a volume busy, a quota reached, a lease "
             "lost, DNS not yet verified)", (
                 "drctl: error [volume_busy]: target standby:7400: volume_busy: another "
                 "source is streaming db",)),
    ExitCode(76, "protocol error: the peer sent what this side cannot accept (version, "
             "geometry, a batch rejected too often)"),
    ExitCode(77, "refused: fenced (the replica has accepted a newer epoch), this "
             "certificate's site may not do that, an epoch no controller token grants, etcd "
             "refuses drctl's credentials", (
                 "drctl: error [stale_epoch]: target standby:7400: stale_epoch: volume db is "
                 "at epoch 3, source sent 2",)),
    ExitCode(130, "interrupted (SIGINT/SIGTERM; a push saved its state: the next run "
             "resumes)"),
    ExitCode(141, "stdout was closed by its reader (`drctl status --json | head`): drctl "
             "stops quietly, as a process ended by SIGPIPE"),
)


# for classes without a docstring of their own (in modules others are reshaping)
_WHAT = {
    "config": "The cluster configuration (or a runbook given as one) cannot be used; also a "
              "failover command's bad flag (file:line: field: message).",
    "key_permissions": "A private key group or others may read (chmod 600).",
}


def error_classes() -> list[type[Exception]]:
    """Every error class a drctl command reports as one line, by its ``code``."""
    from drctl.pki import PkiError
    from failover import audit, config  # noqa: F401  (they define subclasses)
    from failover.api import users  # noqa: F401
    from failover.coordination import credentials  # noqa: F401
    from failover.errors import FailoverError
    from replicator import agent  # noqa: F401
    from replicator.errors import ReplicatorError
    from runbooks.loader import RunbookError

    out: list[type[Exception]] = []
    todo: list[type[Exception]] = [ReplicatorError, FailoverError, RunbookError, PkiError]
    while todo:
        cls = todo.pop(0)
        if cls not in out and not cls.__module__.startswith("tests"):
            out.append(cls)
            todo += cls.__subclasses__()
    return out


def render() -> str:
    classes = error_classes()
    lines = [
        "# drctl on the command line: errors and exit codes",
        "",
        "<!-- generated by `python -m drctl.exitcodes > docs/cli.md`; edit drctl/exitcodes.py "
        "or the error classes -->",
        "",
        "An error is one line on stderr, `drctl: error [CODE]: what is wrong`, never a "
        "traceback; `CODE` is stable (for scripts), the rest is for people. A bad flag is "
        "reported by the parser before the command does anything, with the flag named. "
        "`drctl runbook validate|plan|check` and `drctl drill` report a runbook's errors as "
        "`FILE:LINE: field: message`, one line each (every error at once). A command that "
        "fails creates nothing: `replicate serve --dir` is made only when the daemon "
        "listens (never its parents), `verify` and `fence` never create a replica.",
        "",
        "The same kind of error has the same exit code in every command.",
        "",
        "| exit | meaning | error codes |",
        "|---|---|---|",
    ]
    for entry in TABLE:
        codes = sorted({str(getattr(c, "code", "")) for c in classes
                        if getattr(c, "exit_code", None) == entry.code})
        lines.append(f"| {entry.code} | {_cell(entry.meaning)} | "
                     f"{', '.join(f'`{c}`' for c in codes) or '-'} |")
    lines += ["", "## Examples", ""]
    for entry in TABLE:
        for example in entry.examples:
            lines.append(f"- exit {entry.code}: `{example}`")
    lines += ["", "## Error codes", "", "| code | exit | what |", "|---|---|---|"]
    for cls in sorted(classes, key=lambda c: (int(getattr(c, "exit_code", 0)),
                                               str(getattr(c, "code", "")))):
        code = str(getattr(cls, "code", ""))
        what = _first_sentence(inspect.cleandoc(cls.__doc__)) if cls.__doc__ else ""
        lines.append(f"| `{code}` | {getattr(cls, 'exit_code', '')} | "
                     f"{_cell(what or _WHAT.get(code, cls.__name__))} |")
    return "\n".join(lines) + "\n"


def _first_sentence(doc: str) -> str:
    text = ""
    for line in doc.split("\n\n")[0].splitlines():
        line = line.strip()
        text += line if text.endswith("-") or not text else " " + line
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(render(), end="")
