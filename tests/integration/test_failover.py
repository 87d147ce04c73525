"""Failover end to end with real processes: etcd, named, two site agents, controllers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.procs import DRCTL, Proc, Target, push_cmd, run, wait_for, write_random
from tests.services import EtcdCluster, EtcdServer, NamedServer


def write_config(workdir: str, etcd: EtcdServer | EtcdCluster, named: NamedServer,
                 promote_delay: float = 0, promote_hook: str | None = None,
                 **policy: object) -> str:
    key = os.path.join(workdir, "tsig.key")
    with open(key, "w") as fh:
        fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; secret "{named.secret}"; }};\n')
    hooks = {h: f"echo $DRCTL_EPOCH >> {workdir}/$DRCTL_SITE.{h}" for h in
             ("start", "stop", "fence", "promote")}
    if promote_delay:
        hooks["promote"] = f"sleep {promote_delay}; " + hooks["promote"]
    if promote_hook:
        hooks["promote"] = promote_hook
    pol = {"automatic": True, "grace": 1, "rpo": 30, "damping": 600, **policy}
    cfg = {
        "cluster": "t", "lease_ttl": 2,
        "etcd": etcd.etcd_config(),
        "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
        "services": {"app": {
            "primary": "east", "replica": "west", "policy": pol, "hooks": hooks,
            "dns": {"zone": named.zone, "name": "app", "ttl": 5,
                    "servers": [f"127.0.0.1:{named.port}"],
                    "tsig": {"name": named.key_name, "file": key}, "verify_timeout": 5}}},
    }
    path = os.path.join(workdir, "cluster.yaml")
    with open(path, "w") as fh:
        json.dump(cfg, fh)  # JSON is YAML
    return path


def status(cfg: str) -> dict[str, object]:
    p = run([*DRCTL, "status", "--config", cfg, "--json"])
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


def dig(named: NamedServer) -> str:
    return subprocess.run(["dig", "+short", "-p", str(named.port), "@127.0.0.1", "app.dr.test",
                           "A"], capture_output=True, text=True).stdout.strip()


def east_serving(workdir: str, cfg: str, timeout: float) -> None:
    """East ran its start hook and the controller has seen it serve (a service whose primary
    was never seen has no consistent replica to fail over to)."""
    wait_for(lambda: os.path.exists(f"{workdir}/east.start"), timeout, "east start hook")
    wait_for(lambda: (app(cfg)["sites"]["east"] or {}).get("role")  # type: ignore[index]
             == "primary", timeout, "east's heartbeat as primary")
    import time

    time.sleep(1.0)  # a controller tick (lease TTL / 4) records it


def app(cfg: str) -> dict[str, object]:
    return status(cfg)["services"]["app"]  # type: ignore[index,no-any-return]


def start_all(workdir: str, cfg: str, controllers: int = 1) -> dict[str, Proc]:
    procs = {}
    for site in ("east", "west"):
        procs[site] = Proc([*DRCTL, "--log-level", "INFO", "agent", "--config", cfg, "--site",
                            site], os.path.join(workdir, f"agent-{site}.log")).start()
    for i in range(controllers):
        procs[f"c{i}"] = Proc([*DRCTL, "--log-level", "INFO", "controller", "--config", cfg,
                               "--id", f"c{i}"], os.path.join(workdir, f"c{i}.log")).start()
    return procs


def test_primary_agent_killed_fails_over_and_rewrites_dns(workdir: str, etcd: EtcdServer,
                                                          named: NamedServer) -> None:
    cfg = write_config(workdir, etcd, named, allow_data_loss=True)
    procs = start_all(workdir, cfg)
    try:
        wait_for(lambda: status(cfg)["sites"]["east"]["alive"]  # type: ignore[index]
                 and status(cfg)["sites"]["west"]["alive"], 20, "both agents")  # type: ignore[index]
        east_serving(workdir, cfg, 10)
        assert dig(named) == "10.0.0.1"
        procs["east"].kill9()
        wait_for(lambda: app(cfg)["state"] == "failed_over", 30, "failover to complete")
        s = app(cfg)
        assert (s["primary"], s["replica"], s["epoch"]) == ("west", "east", 2)
        assert dig(named) == "10.0.0.2"
        with open(f"{workdir}/west.promote") as fh:
            assert fh.read().split() == ["2"]
    finally:
        for p in procs.values():
            p.stop()
    for name, p in procs.items():
        assert "Traceback" not in p.log(), f"{name}:\n{p.log()[-3000:]}"


def test_manual_failover_fences_the_live_primary_first(workdir: str, etcd: EtcdServer,
                                                        named: NamedServer) -> None:
    cfg = write_config(workdir, etcd, named, automatic=False)
    procs = start_all(workdir, cfg, controllers=2)
    try:
        wait_for(lambda: status(cfg)["leader"] in ("c0", "c1"), 20, "a leader")
        east_serving(workdir, cfg, 10)
        p = run([*DRCTL, "failover", "app", "--config", cfg])
        assert p.returncode == 0, p.stderr
        wait_for(lambda: app(cfg)["primary"] == "west", 30, "manual failover")
        # the old primary ran its fence hook at the new epoch before west was promoted
        with open(f"{workdir}/east.fence") as fh:
            assert "2" in fh.read().split()
        assert os.path.getmtime(f"{workdir}/east.fence") <= \
            os.path.getmtime(f"{workdir}/west.promote")
        assert dig(named) == "10.0.0.2"
        # the old primary is alive: it comes back as the replica (never an automatic failback)
        wait_for(lambda: app(cfg)["state"] == "healthy", 20, "resync and healthy")
        s = app(cfg)
        assert s["primary"] == "west"
        assert s["history"][-6:] == ["healthy->fencing", "fencing->promoting",  # type: ignore[index]
                                "promoting->rerouting", "rerouting->failed_over",
                                "failed_over->resyncing", "resyncing->healthy"]
    finally:
        for p in procs.values():
            p.stop()
    for name, p in procs.items():
        assert "Traceback" not in p.log(), f"{name}:\n{p.log()[-3000:]}"


def test_refused_dns_update_stops_the_failover_and_is_reported(workdir: str, etcd: EtcdServer,
                                                               named: NamedServer) -> None:
    cfg = write_config(workdir, etcd, named, automatic=False)
    key = os.path.join(workdir, "tsig.key")
    with open(key, "w") as fh:  # a key named does not know
        fh.write('key "intruder" { algorithm hmac-sha256; secret "c2VjcmV0c2VjcmV0"; };\n')
    with open(cfg) as fh:
        doc = json.load(fh)
    doc["services"]["app"]["dns"]["tsig"]["name"] = "intruder"  # (the name the file holds)
    with open(cfg, "w") as fh:
        json.dump(doc, fh)
    procs = start_all(workdir, cfg)
    try:
        east_serving(workdir, cfg, 20)
        assert run([*DRCTL, "failover", "app", "--config", cfg]).returncode == 0
        wait_for(lambda: app(cfg)["state"] == "failed", 30, "the DNS step to fail")
        error = str(app(cfg)["error"])
        assert f"refused by 127.0.0.1:{named.port}" in error, error
        assert dig(named) == "10.0.0.1"
    finally:
        for p in procs.values():
            p.stop()


def test_bad_config_names_file_line_and_field(workdir: str) -> None:
    path = os.path.join(workdir, "bad.yaml")
    with open(path, "w") as fh:
        fh.write("cluster: t\netcd: [127.0.0.1:2379]\nsites:\n  east: {address: 10.0.0.1}\n"
                 "services:\n  app:\n    primary: east\n    replica: nowhere\n")
    p = run([*DRCTL, "status", "--config", path])
    assert p.returncode == 2
    assert f"{path}:8: services.app.replica: unknown site 'nowhere'" in p.stderr
    with open(path, "w") as fh:
        fh.write("cluster: t\netcd: [127.0.0.1:2379]\nsites: {}\nlease_ttl: 2\ncolour: red\n")
    p = run([*DRCTL, "status", "--config", path])
    assert p.returncode == 2 and f"{path}:5: colour: unknown key" in p.stderr


def test_leader_killed_mid_failover_is_replaced_and_the_failover_completes(
        workdir: str, named: NamedServer) -> None:
    cluster = EtcdCluster().start()
    try:
        cfg = write_config(workdir, cluster, named, promote_delay=4, allow_data_loss=True)
        procs = start_all(workdir, cfg, controllers=2)
        try:
            wait_for(lambda: status(cfg)["leader"] in ("c0", "c1"), 20, "a leader")
            east_serving(workdir, cfg, 20)
            cluster.kill9(2)  # an etcd member dies: two of three keep the quorum
            leader = str(status(cfg)["leader"])
            procs["east"].kill9()
            wait_for(lambda: app(cfg)["state"] == "promoting", 30, "the failover to start")
            procs[leader].kill9()  # the leading controller dies mid-failover
            assert app(cfg)["state"] == "promoting"  # (the promote hook takes 4 s)
            wait_for(lambda: app(cfg)["state"] == "failed_over", 40,
                     "the other controller to finish the failover")
            assert status(cfg)["leader"] != leader
            s = app(cfg)
            assert (s["primary"], s["epoch"]) == ("west", 2)
            assert dig(named) == "10.0.0.2"
        finally:
            for p in procs.values():
                p.stop()
    finally:
        cluster.stop()


def _etcd_credentials_for_nobody(cfg: str, workdir: str, etcd: EtcdServer) -> None:
    """The east agent runs as nobody: its copy of etcd's password (0600, owned by nobody) and
    CA (root, who runs the others, reads them too)."""
    import pwd
    import shutil

    sec = etcd.security
    assert sec is not None
    with open(cfg) as fh:
        doc = json.load(fh)
    nobody = pwd.getpwnam("nobody")
    doc["etcd"]["password_file"] = shutil.copy(sec.password_file, f"{workdir}/etcd.password")
    os.chown(doc["etcd"]["password_file"], nobody.pw_uid, nobody.pw_gid)
    doc["etcd"]["ca"] = shutil.copy(sec.ca, f"{workdir}/etcd-ca.crt")
    os.chmod(doc["etcd"]["ca"], 0o644)
    with open(cfg, "w") as fh:
        json.dump(doc, fh)


def test_partitioned_primary_fences_itself_before_the_replica_is_promoted(
        workdir: str, etcd: EtcdServer, named: NamedServer) -> None:
    """The east agent stays alive but cannot reach etcd (iptables drops its packets by uid)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("setpriv"):
        pytest.skip("needs root, iptables and setpriv to cut one process off etcd")
    os.chmod(workdir, 0o777)
    # Replication east -> west at epoch 1; west's promote hook fences its replica at the new
    # epoch, so the old primary's still-running source is refused: never two primaries.
    # (hooks by hand over plaintext: the epoch tokens are the site layer's, tests/security)
    target = Target(workdir, tls=False).start()
    src = os.path.join(workdir, "app.img")
    write_random(src, 1 << 20, seed=7)
    fence = (f"{' '.join(DRCTL)} replicate fence --to {target.address} --volume app "
             f"--epoch $DRCTL_EPOCH --insecure && touch {workdir}/west.promote")
    cfg = write_config(workdir, etcd, named, promote_hook=fence, allow_data_loss=True)
    _etcd_credentials_for_nobody(cfg, workdir, etcd)
    os.chmod(cfg, 0o644)
    os.chmod(os.path.join(workdir, "tsig.key"), 0o644)
    source = Proc(push_cmd(src, target, "app", os.path.join(workdir, "st"), "--epoch", "1",
                           "--interval", "0.1"), os.path.join(workdir, "source.log")).start()
    procs = {
        "east": Proc(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *DRCTL,
                      "--log-level", "INFO", "agent", "--config", cfg, "--site", "east"],
                     os.path.join(workdir, "agent-east.log")).start(),
        "west": Proc([*DRCTL, "--log-level", "INFO", "agent", "--config", cfg, "--site",
                      "west"], os.path.join(workdir, "agent-west.log")).start(),
        "c0": Proc([*DRCTL, "--log-level", "INFO", "controller", "--config", cfg, "--id", "c0"],
                   os.path.join(workdir, "c0.log")).start(),
    }
    rule = ["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(etcd.client_port), "-m", "owner",
            "--uid-owner", "nobody", "-j", "DROP"]
    try:
        east_serving(workdir, cfg, 20)
        subprocess.run(["iptables", "-I", *rule], check=True)
        try:
            wait_for(lambda: app(cfg)["state"] == "failed_over", 30, "failover")
        except TimeoutError as exc:
            logs = {n: p.log()[-1500:] for n, p in procs.items()}
            raise AssertionError(f"{exc}: {app(cfg)}\n{logs}") from None
        east = procs["east"].popen
        assert east is not None and east.poll() is None, procs["east"].log()[-3000:]
        fenced = os.path.getmtime(f"{workdir}/east.fence")
        promoted = os.path.getmtime(f"{workdir}/west.promote")
        assert fenced < promoted, "the replica was promoted before the old primary fenced"
        assert dig(named) == "10.0.0.2"
        # the old primary's replication source (its hooks could not stop it: no etcd) is
        # refused by the fenced replica on its next batch
        with open(src, "r+b") as fh:
            fh.write(b"a write that must not reach the promoted replica")
        assert source.wait(20) == 77, source.log()[-2000:]
        with open(target.image("app"), "rb") as fh:
            assert b"must not reach" not in fh.read()
    finally:
        subprocess.run(["iptables", "-D", *rule])
        for p in procs.values():
            p.stop()
        source.stop()
        target.stop()


def test_a_runbook_drives_the_failover(workdir: str, etcd: EtcdServer,
                                       named: NamedServer) -> None:
    """The daemons take a runbook as --config: its old_primary hooks fence, its new_primary
    hooks and health checks promote (a promotion counts once the checks pass)."""
    key = os.path.join(workdir, "tsig.key")
    with open(key, "w") as fh:
        fh.write(f'key "{named.key_name}" {{ algorithm hmac-sha256; secret "{named.secret}"; }};\n')
    rb = {
        "kind": "drctl-runbook", "version": 1, "cluster": "rb", "lease_ttl": 2,
        "etcd": etcd.etcd_config(),
        "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
        "dns": {"zones": {"dr.test": {"servers": [f"127.0.0.1:{named.port}"],
                                      "tsig": {"name": named.key_name, "file": key}}}},
        "services": {"app": {
            "primary": "east", "replica": "west",
            "failover": {"automatic": False},
            "dns": [{"zone": "dr.test", "name": "app", "ttl": 5}],
            "steps": [
                {"type": "hook", "name": "stop", "at": "old_primary",
                 "run": f"echo $DRCTL_EPOCH > {workdir}/stopped-$DRCTL_SITE"},
                {"type": "promote"},
                {"type": "hook", "name": "start", "at": "new_primary",
                 "run": f"echo $DRCTL_EPOCH > {workdir}/started-$DRCTL_SITE"},
                {"type": "health_check", "name": "started",
                 "command": f"test -s {workdir}/started-west", "retries": 3},
                {"type": "dns"}]}},
    }
    path = os.path.join(workdir, "runbook.yaml")
    with open(path, "w") as fh:
        json.dump(rb, fh)
    procs = start_all(workdir, path)
    try:
        wait_for(lambda: status(path)["sites"]["east"]["alive"]  # type: ignore[index]
                 and status(path)["sites"]["west"]["alive"], 20, "both agents")  # type: ignore[index]
        assert run([*DRCTL, "failover", "app", "--config", path]).returncode == 0
        wait_for(lambda: app(path)["primary"] == "west" and dig(named) == "10.0.0.2", 30,
                 "runbook failover")
        with open(f"{workdir}/stopped-east") as fh:
            assert fh.read().strip() == "2"
        with open(f"{workdir}/started-west") as fh:
            assert fh.read().strip() == "2"
    finally:
        for p in procs.values():
            p.stop()


def test_witness_holds_promotion_while_the_old_primary_still_answers(
        workdir: str, etcd: EtcdServer, named: NamedServer) -> None:
    """The primary's agent dies but its service still answers on the health endpoint (it was
    never stopped): the controller does not promote until the witness stops answering."""
    import http.server
    import threading
    import time

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    cfg = write_config(workdir, etcd, named, allow_data_loss=True)
    with open(cfg) as fh:
        doc = json.load(fh)
    doc["sites"]["east"]["health_url"] = f"http://127.0.0.1:{httpd.server_port}/health"
    with open(cfg, "w") as fh:
        json.dump(doc, fh)
    procs = start_all(workdir, cfg)
    try:
        east_serving(workdir, cfg, 20)
        procs["east"].kill9()
        wait_for(lambda: app(cfg)["state"] == "fencing", 20, "fencing")
        time.sleep(3)  # well past the lease and grace: still held by the witness
        assert app(cfg)["state"] == "fencing" and app(cfg)["primary"] == "east"
        assert dig(named) == "10.0.0.1"
        httpd.shutdown()
        httpd.server_close()
        wait_for(lambda: app(cfg)["state"] == "failed_over", 20, "failover once it stops")
        assert dig(named) == "10.0.0.2"
    finally:
        for p in procs.values():
            p.stop()
