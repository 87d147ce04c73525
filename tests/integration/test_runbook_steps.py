"""The runbook is the program: a failover run by real daemons (etcd, named, two site agents, a
controller) executes exactly the steps `drctl runbook plan` prints, in that order: prechecks,
controller hooks on the leading controller, the old primary's hooks, the new primary's hooks
and health checks, every DNS record, a dependency (``depends_on``) before its dependent; a
hook past its timeout is killed, fails its step and its output is in the record."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.procs import DRCTL, Proc, run, wait_for
from tests.services import EtcdServer, NamedServer


def marker(workdir: str, name: str, where: str = "$DRCTL_SITE") -> str:
    """A hook that appends its name, where it ran and when to the markers file."""
    return f'echo "{name} {where} $(date +%s.%N)" >> {workdir}/markers; echo ran {name}'


def write_runbook(workdir: str, etcd: EtcdServer, named: NamedServer,
                  services: dict[str, object]) -> str:
    key = os.path.join(workdir, "tsig.key")
    with open(key, "w") as fh:
        fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; secret "{named.secret}"; }};\n')
    rb = {"kind": "drctl-runbook", "version": 1, "cluster": "steps", "lease_ttl": 2,
          "etcd": etcd.etcd_config(),
          "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
          "dns": {"zones": {named.zone: {"servers": [f"127.0.0.1:{named.port}"],
                                         "tsig": {"name": named.key_name, "file": key},
                                         "verify_timeout": 5}}},
          "services": services}
    path = os.path.join(workdir, "runbook.yaml")
    with open(path, "w") as fh:
        json.dump(rb, fh)
    return path


def status(cfg: str) -> dict[str, object]:
    p = run([*DRCTL, "status", "--config", cfg, "--json"])
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


def service(cfg: str, name: str) -> dict[str, object]:
    return status(cfg)["services"][name]  # type: ignore[index,no-any-return]


def dig(named: NamedServer, name: str) -> str:
    return subprocess.run(["dig", "+short", "-p", str(named.port), "@127.0.0.1",
                           f"{name}.{named.zone}", "A"], capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def daemons(workdir: str) -> Iterator[dict[str, Proc]]:
    procs: dict[str, Proc] = {}
    yield procs
    for p in procs.values():
        p.stop()
    for name, p in procs.items():
        assert "Traceback" not in p.log(), f"{name}:\n{p.log()[-3000:]}"


def start(workdir: str, cfg: str, procs: dict[str, Proc], services: list[str]) -> None:
    for site in ("east", "west"):
        procs[site] = Proc([*DRCTL, "--log-level", "INFO", "agent", "--config", cfg, "--site",
                            site], os.path.join(workdir, f"agent-{site}.log")).start()
    procs["c0"] = Proc([*DRCTL, "--log-level", "INFO", "controller", "--config", cfg, "--id",
                        "c0"], os.path.join(workdir, "c0.log")).start()

    def serving() -> bool:
        s = status(cfg)
        sites = s["sites"]  # type: ignore[index]
        return s["leader"] == "c0" and all(
            (sites["east"]["services"].get(n) or {}).get("role") == "primary"  # type: ignore[index]
            for n in services)
    wait_for(serving, 30, "east serving every service, seen by the controller")
    time.sleep(1.0)  # a controller tick records it (a primary never seen has no replica)


def wait_state(cfg: str, name: str, states: tuple[str, ...], timeout: float,
               procs: dict[str, Proc], primary: str | None = None) -> None:
    def there() -> bool:
        s = service(cfg, name)
        return s["state"] in states and primary in (None, s["primary"])
    try:
        wait_for(there, timeout, f"{name} {states}", interval=0.2)
    except TimeoutError:
        logs = "\n".join(f"--- {n}\n{p.log()[-4000:]}" for n, p in procs.items())
        raise AssertionError(f"{json.dumps(status(cfg), indent=1)}\n{logs}") from None


def planned(cfg: str, service_name: str, names: list[str]) -> list[str]:
    """The marker names in the order `drctl runbook plan` prints their steps."""
    p = run([*DRCTL, "runbook", "plan", cfg, service_name])
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        found = [n for n in names if f" {n} " in line]
        assert len(found) <= 1, line
        out += found
    return out


def test_a_failover_runs_exactly_the_plan_dependencies_first(workdir: str, etcd: EtcdServer,
                                                             named: NamedServer,
                                                             daemons: dict[str, Proc]) -> None:
    db = {"primary": "east", "replica": "west", "failover": {"automatic": False},
          "dns": [{"zone": named.zone, "name": "db", "ttl": 5}],
          "steps": [
              {"type": "precheck", "name": "reach", "check": "sites_reachable"},
              {"type": "hook", "name": "db-announce", "at": "controller",
               "run": marker(workdir, "db-announce", "$DRCTL_CONTROLLER")},
              {"type": "hook", "name": "db-stop", "at": "old_primary",
               "run": marker(workdir, "db-stop")},
              {"type": "promote"},
              {"type": "hook", "name": "db-start", "at": "new_primary",
               "run": marker(workdir, "db-start")},
              {"type": "health_check", "name": "db-check",
               "command": marker(workdir, "db-check"), "retries": 1, "interval": 0.2},
              {"type": "hook", "name": "db-tell", "at": "controller",
               "run": marker(workdir, "db-tell", "$DRCTL_CONTROLLER"), "timeout": 10},
              {"type": "dns"},
              {"type": "hook", "name": "db-done", "at": "controller",
               "run": marker(workdir, "db-done", "$DRCTL_CONTROLLER")}]}
    app = {"primary": "east", "replica": "west", "depends_on": ["db"],
           "failover": {"automatic": False},
           "dns": [{"zone": named.zone, "name": "app", "ttl": 5},
                   {"zone": named.zone, "name": "www", "ttl": 5}],
           "steps": [
               {"type": "hook", "name": "app-stop", "at": "old_primary",
                "run": marker(workdir, "app-stop")},
               {"type": "promote"},
               {"type": "hook", "name": "app-start", "at": "new_primary",
                "run": marker(workdir, "app-start")},
               {"type": "dns"}]}
    cfg = write_runbook(workdir, etcd, named, {"db": db, "app": app})
    names = ["db-announce", "db-stop", "db-start", "db-check", "db-tell", "db-done",
             "app-stop", "app-start"]
    plan = planned(cfg, "app", names)
    assert plan == names  # (the runbook lists them in the order they run)
    start(workdir, cfg, daemons, ["db", "app"])
    p = run([*DRCTL, "failover", "app", "--config", cfg])  # app: db moves first
    assert p.returncode == 0, p.stderr
    # failed over (and, with hooks only, at once resynced: nothing to resend)
    wait_state(cfg, "app", ("failed_over", "resyncing", "healthy"), 60, daemons, "west")
    with open(os.path.join(workdir, "markers")) as fh:
        ran = [line.split() for line in fh]
    assert [r[0] for r in ran] == plan, ran
    times = [float(r[2]) for r in ran]
    assert times == sorted(times)
    where = {r[0]: r[1] for r in ran}
    assert (where["db-announce"], where["db-tell"], where["db-done"]) == ("c0", "c0", "c0")
    assert (where["db-stop"], where["db-start"], where["app-stop"]) == ("east", "west", "east")
    # every record of each service rewritten and verified
    assert (dig(named, "db"), dig(named, "app"), dig(named, "www")) == ("10.0.0.2",) * 3
    db_op = service(cfg, "db")["operation"]
    assert db_op is not None and db_op["outcome"] == "done"  # type: ignore[index]
    steps = db_op["steps"]  # type: ignore[index]
    assert [(s["name"], s["status"]) for s in steps] == [
        ("reach", "done"), ("db-announce", "done"), ("fence", "done"), ("db-stop", "done"),
        ("promote", "done"), ("db-start", "done"), ("db-check", "done"), ("db-tell", "done"),
        ("dns", "done"), ("db-done", "done")]
    by_name = {s["name"]: s for s in steps}
    assert by_name["db-stop"]["output"] == "ran db-stop"
    assert by_name["dns"]["output"].startswith(f"db.{named.zone} A -> 10.0.0.2")
    app_op = service(cfg, "app")["operation"]
    assert app_op["requested_for"] is None and db_op["requested_for"] == "app"  # type: ignore[index]
    assert "www" in app_op["steps"][-1]["output"]  # type: ignore[index]


def test_a_hook_past_its_timeout_is_killed_and_fails_its_step(workdir: str, etcd: EtcdServer,
                                                               named: NamedServer,
                                                               daemons: dict[str, Proc]
                                                               ) -> None:
    slow = "echo started on $DRCTL_SITE; sleep 61.25; echo never"
    app = {"primary": "east", "replica": "west", "failover": {"automatic": False},
           "dns": [{"zone": named.zone, "name": "app", "ttl": 5}],
           "steps": [{"type": "promote"},
                     {"type": "hook", "name": "slow start", "at": "new_primary", "run": slow,
                      "timeout": 2},
                     {"type": "dns"}]}
    cfg = write_runbook(workdir, etcd, named, {"app": app})
    start(workdir, cfg, daemons, ["app"])
    assert run([*DRCTL, "failover", "app", "--config", cfg]).returncode == 0
    wait_state(cfg, "app", ("failed",), 40, daemons)
    s = service(cfg, "app")
    op = s["operation"]
    assert op is not None and op["failed_step"] == "promoting"  # type: ignore[index]
    run_ = next(r for r in op["steps"] if r["name"] == "slow start")  # type: ignore[index]
    assert (run_["status"], run_["error"]) == ("failed", "timed out after 2s: killed")
    assert run_["output"] == "started on west" and run_["seconds"] < 10
    assert "step 3 (hook 'slow start') on west failed: timed out after 2s" in str(s["error"])
    assert any("output of slow start: started on west" in line
               for line in s["progress"])  # type: ignore[union-attr]
    # killed with everything it started (its process group): no sleep left behind
    left = subprocess.run(["pgrep", "-f", "sleep 61.25"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
    assert dig(named, "app") != "10.0.0.2"  # the failover stopped before dns
    time.sleep(2)  # the failed step is not run again (until an operator retries)
    log = daemons["west"].log()
    assert log.count("step 3 hook 'slow start'\n") == 1, log[-2000:]  # started once
