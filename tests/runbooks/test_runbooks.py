"""Runbooks: every example is valid (by the loader and by the published JSON Schema) and has a
plan; every case under runbooks/invalid fails with the error its expected.txt names."""

from __future__ import annotations

import glob
import json
import os

import jsonschema
import pytest
import yaml

from runbooks.loader import RunbookError, load
from runbooks.plan import order, plan
from runbooks.schema import schema
from tests.procs import DRCTL, REPO, run
from tests.runbooks.helpers import TWO_SITES_DB

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "runbooks", "examples", "*.yaml")))
INVALID = sorted(glob.glob(os.path.join(REPO, "runbooks", "invalid", "*", "runbook.yaml")))


def test_there_are_at_least_three_examples_and_seven_invalid_cases() -> None:
    assert len(EXAMPLES) >= 3 and len(INVALID) >= 7


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_is_valid_and_plans(path: str) -> None:
    rb = load(path)
    with open(path) as fh:
        jsonschema.validate(yaml.safe_load(fh), schema())
    for name in rb.services:
        steps = plan(rb, name)
        assert steps and steps[0].startswith("1. ")
        assert any("promote" in s for s in steps)
        p = run([*DRCTL, "runbook", "plan", path, name])
        assert p.returncode == 0 and "1. [" in p.stdout, p.stderr


@pytest.mark.parametrize("path", INVALID, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_invalid_case_fails_with_its_error(path: str) -> None:
    with open(os.path.join(os.path.dirname(path), "expected.txt")) as fh:
        expected = fh.read().strip()
    with pytest.raises(RunbookError) as info:
        load(path)
    assert any(expected in e for e in info.value.errors), info.value.errors
    p = run([*DRCTL, "runbook", "validate", path])
    assert p.returncode == 2 and expected in p.stderr  # a configuration error (docs/cli.md)


def test_every_error_is_reported_at_once() -> None:
    path = os.path.join(REPO, "runbooks", "invalid", "several-errors", "runbook.yaml")
    with pytest.raises(RunbookError) as info:
        load(path)
    assert len(info.value.errors) >= 6
    assert all(e.startswith(path + ":") for e in info.value.errors)


def test_a_misspelt_key_is_one_error_that_names_the_key_it_stands_for() -> None:
    """"replicas" for "replica": one error with the likely key, not a second one saying the
    required "replica" is missing."""
    path = os.path.join(REPO, "runbooks", "invalid", "unknown-key", "runbook.yaml")
    with pytest.raises(RunbookError) as info:
        load(path)
    assert info.value.errors == [
        f"{path}:9: services.db.replicas: unknown key; did you mean 'replica'? (allowed: "
        "depends_on, dns, failover, primary, replica, replication, steps, volumes)"]


def _small(tmp_path: str, step_type: str) -> str:
    """TWO_SITES_DB with db's one step of type ``step_type``."""
    path = os.path.join(tmp_path, "rb.yaml")
    with open(path, "w") as fh:
        fh.write(TWO_SITES_DB + f"    steps: [{{type: {step_type}}}]\n")
    return path


def test_check_of_a_service_without_health_checks_says_so(tmp_path: str) -> None:
    path = _small(tmp_path, "promote")
    p = run([*DRCTL, "runbook", "check", path, "db"])
    assert p.returncode == 0 and p.stdout == \
        "db: the runbook gives it no health checks (nothing to run)\n", p.stdout + p.stderr


def test_a_misspelt_step_type_names_the_likely_one(tmp_path: str) -> None:
    path = _small(tmp_path, "promte")
    with pytest.raises(RunbookError) as info:
        load(path)
    assert any("unknown step type 'promte'; did you mean 'promote'?" in e
               for e in info.value.errors), info.value.errors


def test_dependencies_come_first() -> None:
    rb = load(os.path.join(REPO, "runbooks", "examples", "two-site-web.yaml"))
    assert order(rb, "app") == ["db", "app"]
    lines = plan(rb, "app")
    steps = [line for line in lines if line[0].isdigit()]
    assert steps[0].startswith("1. [db]") and steps[-2].startswith("13. [app] dns")
    assert steps[-1].startswith("14. [app] hook tell the on-call on the controller")
    assert "shop.dr.test A -> 10.0.0.2" in steps[-2] and "; www.dr.test A" in steps[-2]
    assert steps[7].startswith("8. [app] wait until db finished")
    assert lines[len(steps)] == "data path (what the site agents run):"
    assert any("zero lag" in s for s in plan(rb, "db", switchover=True))


def test_published_schema_is_current() -> None:
    with open(os.path.join(REPO, "runbooks", "schema.json")) as fh:
        assert json.load(fh) == schema(), "run: python -m runbooks.schema > runbooks/schema.json"


# A valid runbook with a data path; each case below edits one line of it. Line numbers:
# 6-7 the sites, 12 the volumes of db, 13 its replication block.
BASE = """\
kind: drctl-runbook
version: 1
cluster: c
etcd: ["127.0.0.1:2379"]
sites:
  a: {address: 10.0.0.1, data_dir: /var/lib/drctl, endpoints: {replication: "10.0.0.1:7400"}}
  b: {address: 10.0.0.2, data_dir: /var/lib/drctl, endpoints: {replication: "10.0.0.2:7400"}}
services:
  db:
    primary: a
    replica: b
    volumes: [{name: data, path: "/srv/{site}/db.img", group: db}]
    replication: {mode: hot, export: "127.0.0.1:10809"}
    steps: [{type: promote}]
"""
REP = '    replication: {mode: hot, export: "127.0.0.1:10809"}\n'
WEB = """\
  web:
    primary: b
    replica: a
    volumes: [{name: web, path: /srv/web.img}]
    replication:
      mode: warm
      export: "127.0.0.1:10810"
    steps: [{type: promote}]
"""


def _runbook(tmp_path: str, *edits: tuple[str, str]) -> str:
    text = BASE
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(tmp_path, "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def test_data_path_base_is_valid_and_planned(tmp_path: str) -> None:
    path = _runbook(tmp_path)
    rb = load(path)
    assert rb.sites["a"].data_dir == "/var/lib/drctl"
    assert rb.services["db"].export == {"a": "127.0.0.1:10809", "b": "127.0.0.1:10809"}
    lines = plan(rb, "db")
    assert "  [db] consistency group db: hot, no rate limit, zstd level 1, consistency points " \
           "cut as soon as the previous are sent, journal 1GiB, background verify 2MiB/s" \
           in lines
    assert "  [db] b (replica): data_dir /var/lib/drctl, target 10.0.0.2:7400, export " \
           "127.0.0.1:10809; data /srv/b/db.img" in lines


def test_verify_rate_is_a_rate_or_0_for_off(tmp_path: str) -> None:
    for text, want in (("4MiB/s", 4 << 20), ("64KiB", 64 << 10), ("0", 0), ("off", 0),
                       ('"off"', 0)):
        rb = load(_runbook(tmp_path, ("{mode: hot,", f"{{mode: hot, verify_rate: {text},")))
        assert rb.services["db"].verify_rate == want, text
    assert any(line.endswith("journal 1GiB, no background verify") for line in plan(rb, "db"))


def test_export_tls_is_planned(tmp_path: str) -> None:
    path = _runbook(tmp_path, ("{mode: hot,", "{mode: hot, export_tls: true,"))
    rb = load(path)
    assert rb.services["db"].export_tls
    assert "  [db] a (primary): data_dir /var/lib/drctl, target 10.0.0.1:7400, export " \
           "127.0.0.1:10809 (TLS); data /srv/a/db.img" in plan(rb, "db")


def test_a_service_without_volumes_has_no_data_path_and_no_mode_to_agree_on(
        tmp_path: str) -> None:
    path = _runbook(tmp_path, ("services:\n", "services:\n  dns-only:\n    primary: a\n"
                               "    replica: b\n    replication: {mode: warm}\n"
                               "    steps: [{type: promote}]\n"))
    rb = load(path)
    assert "  [dns-only] no volumes: nothing to replicate" in plan(rb, "dns-only")


def test_sites_may_differ_in_mode(tmp_path: str) -> None:
    sites = "".join(f'  {n}: {{address: 10.0.1.{i}, data_dir: /d, endpoints: {{replication: '
                    f'"10.0.1.{i}:7400"}}}}\n' for i, n in enumerate("cd", 1))
    path = _runbook(tmp_path, ("services:\n", sites + "services:\n"),
                    ("services:\n", "services:\n" + WEB.replace("primary: b", "primary: c")
                     .replace("replica: a", "replica: d")))
    assert load(path).services["web"].mode == "warm"


CASES = {
    "missing-data-dir": (
        [("  b: {address: 10.0.0.2, data_dir: /var/lib/drctl,", "  b: {address: 10.0.0.2,")],
        12, "services.db.volumes", "site b lacks data_dir: its agent cannot run"),
    "missing-replication-endpoint": (
        [(', endpoints: {replication: "10.0.0.1:7400"}}', "}")],
        12, "services.db.volumes", "site a lacks endpoints.replication:"),
    "missing-export": (
        [(REP, "    replication: {mode: hot}\n")],
        12, "services.db.volumes", "site a lacks services.db.replication.export:"),
    "export-missing-a-site": (
        [('export: "127.0.0.1:10809"', 'export: {a: "127.0.0.1:10809"}')],
        12, "services.db.volumes", "site b lacks services.db.replication.export:"),
    "mixed-groups": (
        [("group: db}]", 'group: db}, {name: log, path: /srv/log.img, group: logs}]')],
        12, "services.db.volumes", "one consistency group; they name several (db, logs)"),
    "mixed-modes-on-a-site": (
        [("    steps: [{type: promote}]\n", "    steps: [{type: promote}]\n" + WEB)],
        20, "services.web.replication.mode",
        "warm, but it shares sites b, a with db (hot): a site runs one replication target "
        "daemon, in one mode (hot or warm)"),
    "mixed-modes-implicit-hot": (
        [(REP, '    replication: {export: "127.0.0.1:10809"}\n'),
         ("    steps: [{type: promote}]\n", "    steps: [{type: promote}]\n" + WEB)],
        20, "services.web.replication.mode", "warm, but it shares sites b, a with db (hot)"),
    "bad-export": (
        [('export: "127.0.0.1:10809"', 'export: "127.0.0.1"')],
        13, "services.db.replication.export", "'127.0.0.1' is not HOST:PORT"),
    "bad-export-in-a-mapping": (
        [('export: "127.0.0.1:10809"', 'export: {a: "127.0.0.1:10809", b: nope}')],
        13, "services.db.replication.export", "b: 'nope' is not HOST:PORT"),
    "export-of-an-unknown-site": (
        [('export: "127.0.0.1:10809"', 'export: {a: "127.0.0.1:1", b: "127.0.0.1:1", '
                                       'c: "127.0.0.1:1"}')],
        13, "services.db.replication.export.c", "unknown site 'c'"),
    "export-not-a-string": (
        [('export: "127.0.0.1:10809"', "export: [127.0.0.1:10809]")],
        13, "services.db.replication.export", "expected HOST:PORT (the same at every site)"),
    "export-tls-not-a-boolean": (
        [("{mode: hot,", "{mode: hot, export_tls: yes please,")],
        13, "services.db.replication.export_tls", "expected true or false"),
    "apply-interval-without-warm": (
        [("{mode: hot,", "{mode: hot, apply_interval: 60,")],
        13, "services.db.replication.apply_interval", "only a warm replica applies on a schedule"),
    "journal-limit-too-small": (
        [("{mode: hot,", "{mode: hot, journal_limit: 512KiB,")],
        13, "services.db.replication.journal_limit", "at least 1MiB"),
    "rate-limit-without-unit": (
        [("{mode: hot,", "{mode: hot, rate_limit: 20,")],
        13, "services.db.replication.rate_limit",
        "'20' is 20 bytes/s, below the 64KiB/s minimum: a cap that low is almost certainly a "
        "unit mistake (did you mean 20MB/s?)"),
    "rate-limit-in-kilobytes": (
        [("{mode: hot,", "{mode: hot, rate_limit: 20kB/s,")],
        13, "services.db.replication.rate_limit", "(did you mean 20MB/s?)"),
    "verify-rate-without-unit": (
        [("{mode: hot,", "{mode: hot, verify_rate: 20,")],
        13, "services.db.replication.verify_rate",
        "'20' is 20 bytes/s, below the 64KiB/s minimum: a verify rate that low is almost "
        "certainly a unit mistake (did you mean 20MB/s? 0 turns the background verify off)"),
    "verify-rate-not-a-rate": (
        [("{mode: hot,", "{mode: hot, verify_rate: fast,")],
        13, "services.db.replication.verify_rate", "invalid rate 'fast'"),
    "bad-compression": (
        [("{mode: hot,", "{mode: hot, compression: 23,")],
        13, "services.db.replication.compression", "expected zstd, none or a zstd level 0..22"),
    "unknown-endpoint": (
        [('{replication: "10.0.0.1:7400"}', '{replication: "10.0.0.1:7400", metrics: "x:1"}')],
        6, "sites.a.endpoints.metrics",
        "unknown endpoint (known: health, replication, source_metrics, target_metrics)"),
    "replication-endpoint-not-hostport": (
        [('{replication: "10.0.0.1:7400"}', '{replication: "10.0.0.1"}')],
        6, "sites.a.endpoints.replication", "'10.0.0.1' is not HOST:PORT (the site's "
        "replication target, which services.db needs)"),
    "relative-data-dir": (
        [("a: {address: 10.0.0.1, data_dir: /var/lib/drctl", "a: {address: 10.0.0.1, data_dir: x")],
        6, "sites.a.data_dir", "expected an absolute path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_path_validation(tmp_path: str, case: str) -> None:
    edits, line, field, message = CASES[case]
    path = _runbook(tmp_path, *edits)
    with pytest.raises(RunbookError) as info:
        load(path)
    prefix = f"{path}:{line}: {field}: "
    assert any(e.startswith(prefix) and message in e for e in info.value.errors), \
        (prefix, message, info.value.errors)
    assert len(info.value.errors) == 1 or case.startswith("missing-"), info.value.errors


def test_key_files_are_relative_to_the_runbook(tmp_path: object) -> None:
    """A runbook reads the same key files whatever the current directory is."""
    import shutil

    from runbooks.loader import load

    d = os.path.join(str(tmp_path), "conf")
    os.makedirs(d)
    src = os.path.join(os.path.dirname(__file__), "..", "..", "runbooks", "examples",
                       "two-site-web.yaml")
    shutil.copy(src, os.path.join(d, "rb.yaml"))
    rb = load(os.path.join(d, "rb.yaml"))
    files = [z.tsig_file for z in rb.zones.values() if z.tsig_file]
    assert files and all(f.startswith(d + os.sep) for f in files), files
