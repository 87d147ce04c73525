"""Everyday mistakes, each run as a real `drctl` process: the answer is one line on stderr
naming the problem, the exit code of docs/cli.md, no traceback, and nothing created.

(Issue 11: "an operator never meets a traceback".) Ports in use are bound by the test first;
192.0.2.1 (TEST-NET-1) is an address this host does not have. The replication channel is
mutual TLS, as in production, so no --insecure warning joins the error line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from drctl.localservers import free_port
from tests.procs import DRCTL, REPO, Pki, Proc, Target, run, wait_for, write_random

SIZE = 256 << 10


def one_line(p: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit ``code``, stderr exactly one line holding every one of ``words``, no traceback."""
    said = p.stderr.strip()
    assert "Traceback" not in p.stderr, said
    assert p.returncode == code, f"exit {p.returncode}, not {code}: {said}"
    assert len(said.splitlines()) == 1, said
    for word in words:
        assert word in said, f"{word!r} not in: {said}"
    return said


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def volume(workdir: str) -> str:
    path = os.path.join(workdir, "vol.img")
    write_random(path, SIZE)
    return path


@pytest.fixture
def cluster_yaml(workdir: str) -> str:
    """A cluster configuration whose etcd nobody listens on (errors come before it is used)."""
    path = os.path.join(workdir, "cluster.yaml")
    with open(path, "w") as fh:
        json.dump({"cluster": "c", "etcd": [f"127.0.0.1:{free_port()}"],
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh)
    return path


def serve(deployment: Pki, listen: str, directory: str, *extra: str) -> list[str]:
    return [*DRCTL, "replicate", "serve", "--listen", listen, "--dir", directory,
            *deployment.flags("west"), "--allow", "east", *extra]


def push(deployment: Pki, path: str, state: str, *extra: str) -> list[str]:
    return [*DRCTL, "replicate", "push", path, "--to", f"127.0.0.1:{free_port()}",
            "--volume", "db", "--state-dir", state, *deployment.flags("east", "west"), *extra]


# -- addresses: a port in use, an address the host does not have ---------------------------


def test_serve_on_a_port_in_use_creates_nothing(workdir: str, deployment: Pki,
                                                busy_port: int) -> None:
    d = os.path.join(workdir, "replicas")
    one_line(run(serve(deployment, f"127.0.0.1:{busy_port}", d)), 2, f"--listen 127.0.0.1:"
             f"{busy_port}", "already in use")
    one_line(run(serve(deployment, f"127.0.0.1:{free_port()}", d, "--metrics-port",
                       str(busy_port))), 2, "--metrics-port", "already in use")
    one_line(run(serve(deployment, f"192.0.2.1:{free_port()}", d)), 2, "--listen 192.0.2.1",
             "no such address")
    assert not os.path.exists(d)


def test_push_nbd_listen_on_a_port_in_use_creates_no_state(workdir: str, deployment: Pki,
                                                            volume: str,
                                                            busy_port: int) -> None:
    state = os.path.join(workdir, "state")
    one_line(run(push(deployment, volume, state, "--nbd-listen", f"127.0.0.1:{busy_port}")),
             2, "--nbd-listen", "already in use")
    one_line(run(push(deployment, volume, state, "--once", "--metrics-port", str(busy_port))),
             2, "--metrics-port", "already in use")
    assert not os.path.exists(state)


def test_controller_and_api_on_a_port_in_use(workdir: str, cluster_yaml: str,
                                             busy_port: int) -> None:
    one_line(run([*DRCTL, "controller", "--config", cluster_yaml, "--metrics-port",
                  str(busy_port)]), 2, "--metrics-port", "already in use")
    token = os.path.join(workdir, "token")
    with open(token, "w") as fh:
        fh.write("a-token-long-enough-for-the-api")
    p = run([*DRCTL, "api", "--config", cluster_yaml, "--listen", f"127.0.0.1:{busy_port}",
             "--token-file", token, "--insecure"])
    # --insecure's own warning comes first; the error is the one line after it
    assert p.stderr.splitlines()[0].startswith("drctl api: warning: plain HTTP"), p.stderr
    p.stderr = "\n".join(p.stderr.splitlines()[1:])
    one_line(p, 2, "--listen", "already in use")


# -- directories ---------------------------------------------------------------------------


def test_serve_dir_that_cannot_be_used(workdir: str, deployment: Pki, volume: str) -> None:
    listen = f"127.0.0.1:{free_port()}"
    one_line(run(serve(deployment, listen, volume)), 2, f"--dir {volume}", "not a directory")
    missing = os.path.join(workdir, "nonexistent", "x")
    one_line(run(serve(deployment, listen, missing)), 2, "no such directory")
    assert not os.path.exists(os.path.dirname(missing))
    if os.geteuid() == 0:
        unwritable = "/proc/1"  # not even root makes files there
    else:
        unwritable = os.path.join(workdir, "ro")
        os.mkdir(unwritable, 0o555)
    one_line(run(serve(deployment, listen, unwritable)), 2, "not writable")


def test_push_volume_or_state_dir_that_cannot_be_used(workdir: str, deployment: Pki,
                                                      volume: str) -> None:
    one_line(run(push(deployment, workdir, os.path.join(workdir, "s"), "--once")), 2,
             "is a directory")
    one_line(run(push(deployment, volume, os.path.join(volume, "state"), "--once")), 2,
             "--state-dir", "not a directory")
    one_line(run([*DRCTL, "replicate", "verify", volume, "--to", "127.0.0.1:7400", "--volume",
                  "db", "--tls-dir", os.path.join(workdir, "no-tls"), "--site", "east"]),
             2, "--tls-dir", "no such directory")
    one_line(run([*DRCTL, "certs", "init", "--dir", volume]), 2, "[pki]", "not a directory")
    one_line(run([*DRCTL, "certs", "init", "--dir", os.path.join(volume, "ca")]), 2, "[pki]",
             "Not a directory")  # a parent that is a file
    ca = os.path.join(workdir, "ca")  # a bad --config is refused before the CA is made
    one_line(run([*DRCTL, "certs", "init", "--dir", ca, "--config",
                  os.path.join(workdir, "nosuch.yaml")]), 2, "[config]", "nosuch.yaml")
    assert not os.path.exists(ca)
    one_line(run([*DRCTL, "api", "users", "add", "ann", "--role", "viewer", "--file",
                  workdir]), 2, "[users_file]", "a directory")


def test_a_certificate_name_the_deployment_lacks_is_named_with_those_it_has(
        deployment: Pki, volume: str) -> None:
    line = one_line(run([*DRCTL, "replicate", "verify", volume, "--to", "127.0.0.1:7400",
                         "--volume", "db", "--tls-dir", deployment.dir, "--operator",
                         "nosuch"]), 2, "[pki]", "no certificate for operator nosuch")
    operators = sorted(f[:-4] for f in os.listdir(os.path.join(deployment.dir, "operators"))
                       if f.endswith(".crt"))
    assert operators and f"its operators are {', '.join(operators)}" in line, line


# -- flags the parser refuses, with the flag named -----------------------------------------


@pytest.mark.parametrize(("flags", "words"), [
    (["--rate-limit", "20"], ["--rate-limit", "unit mistake", "20MB/s"]),
    (["--verify-rate", "20"], ["--verify-rate", "unit mistake", "20MB/s", "0 turns"]),
    (["--interval", "-1"], ["--interval", "'-1'"]),
    (["--connect-timeout", "0"], ["--connect-timeout"]),
    (["--compress-level", "99"], ["--compress-level"]),
])
def test_the_parser_refuses_values_that_make_no_sense(workdir: str, deployment: Pki,
                                                      volume: str, flags: list[str],
                                                      words: list[str]) -> None:
    state = os.path.join(workdir, "state")
    said = one_line(run(push(deployment, volume, state, *flags)), 2, "[usage]", *words)
    assert said.startswith("drctl: error [usage]: argument ")
    assert not os.path.exists(state)


def test_version_and_help() -> None:
    p = run([*DRCTL, "--version"])
    assert p.returncode == 0 and p.stdout.startswith("drctl ") and p.stdout.split()[1][0] \
        .isdigit(), p.stdout + p.stderr
    p = run([*DRCTL, "--help"])
    assert p.returncode == 0
    for command in ("replicate", "push-group", "fence", "agent", "controller", "status",
                    "failover", "switchover", "failback", "retry", "cancel", "api", "audit",
                    "runbook", "drill", "certs"):
        assert command in p.stdout, command
    p = run([*DRCTL, "replicate", "--help"])
    assert all(c in p.stdout for c in ("serve", "push-group", "fence", "verify"))
    one_line(run([*DRCTL]), 2, "COMMAND")


# -- verify against a target: no such replica, a stopped target ------------------------------


def test_verify_no_such_replica_creates_none(target: Target, volume: str) -> None:
    p = run([*DRCTL, "replicate", "verify", volume, "--to", target.address, "--volume",
             "nosuch", *target.client_flags()])
    one_line(p, 66, "[volume_not_found]", "no such replica", "nosuch")
    assert not [f for f in os.listdir(target.dir) if f.startswith("nosuch")]
    p = run([*DRCTL, "replicate", "fence", "--to", target.address, "--volume", "nosuch",
             "--epoch", "0", *target.client_flags("west")])
    one_line(p, 66, "[volume_not_found]", "nosuch")
    assert not [f for f in os.listdir(target.dir) if f.startswith("nosuch")]


def test_verify_and_fence_give_up_on_a_stopped_target(deployment: Pki, volume: str) -> None:
    to = f"127.0.0.1:{free_port()}"  # nobody listens
    for cmd in (["verify", volume], ["fence", "--epoch", "1"]):
        p = run([*DRCTL, "replicate", *cmd, "--to", to, "--volume", "db",
                 "--connect-timeout", "1", *deployment.flags("east", "west")], timeout=30)
        one_line(p, 69, "[target_unavailable]", f"target {to}: no connection within 1s",
                 "Connection refused")


def test_a_target_that_never_answers_is_given_up_on(deployment: Pki, volume: str) -> None:
    """Something listens but never completes a handshake (a hung process, a TLS terminator
    that does not answer): the same one line, after the connect timeout and a short probe
    for a reason (there is none to find), not the old 5 s more."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        to = f"127.0.0.1:{lsock.getsockname()[1]}"
        started = time.monotonic()
        p = run([*DRCTL, "replicate", "verify", volume, "--to", to, "--volume", "db",
                 "--connect-timeout", "1", *deployment.flags("east", "west")], timeout=30)
        took = time.monotonic() - started
    said = one_line(p, 69, "[target_unavailable]", f"target {to}: no connection within 1s")
    assert "is `drctl replicate serve` running there" in said, said
    assert took >= 1.0, took


# -- configuration files and runbooks -------------------------------------------------------


def test_not_a_runbook_is_one_error(workdir: str) -> None:
    path = os.path.join(workdir, "notes.yaml")
    with open(path, "w") as fh:
        fh.write("hello: world\nitems: [1, 2]\nowner: me\n")
    said = one_line(run([*DRCTL, "runbook", "validate", path]), 2, "not a drctl runbook")
    assert said.startswith(f"{path}:1: ")


def test_convert_refuses_a_file_that_is_a_runbook_already() -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "..", "runbooks", "examples",
                           "three-site.yaml")
    one_line(run([*DRCTL, "runbook", "convert", example]), 2, "[config]",
             "already a runbook", "runbook validate")


def test_missing_top_level_keys_are_named_together(workdir: str) -> None:
    path = os.path.join(workdir, "small.yaml")
    with open(path, "w") as fh:
        fh.write("etcd: [127.0.0.1:2379]\n")
    said = one_line(run([*DRCTL, "status", "--config", path]), 2, "[config]")
    assert said.endswith(f"{path}:1: top level: missing required keys 'cluster', 'sites'"), \
        said


def test_an_empty_config_and_drill_config_flag(workdir: str) -> None:
    empty = os.path.join(workdir, "empty.yaml")
    with open(empty, "w") as fh:
        fh.write("# nothing yet\n")
    said = one_line(run([*DRCTL, "status", "--config", empty]), 2, "[config]")
    assert said.endswith(f"{empty}: the file is empty (expected a cluster configuration or "
                         "a runbook)"), said
    # drill names its file --runbook, and --config as every other command (the same check)
    for flag in ("--runbook", "--config"):
        one_line(run([*DRCTL, "drill", "app", flag, empty]), 2, empty, "not a drctl runbook")


def test_one_config_error_one_exit_code_in_every_command(workdir: str) -> None:
    """A file that cannot be a configuration: every command that reads one says so in one
    line and exits 2 (docs/cli.md)."""
    binary = os.path.join(workdir, "blob.bin")
    with open(binary, "wb") as fh:
        fh.write(bytes(range(128, 256)) * 16)
    missing = os.path.join(workdir, "missing.yaml")
    every = (["status", "--config", "F"], ["agent", "--site", "east", "--config", "F"],
             ["failover", "app", "--config", "F"], ["audit", "show", "--config", "F"],
             ["runbook", "validate", "F"], ["runbook", "plan", "F", "app"],
             ["drill", "app", "--runbook", "F"])
    for cmd in every:
        one_line(run([*DRCTL, *(binary if a == "F" else a for a in cmd)]), 2, binary,
                 "not UTF-8 text")
    text_then_binary = os.path.join(workdir, "half.yaml")  # the line of the first bad byte
    with open(text_then_binary, "wb") as fh:
        fh.write(b"kind: drctl-runbook\nversion: 1\n\xff\xfe\n")
    said = one_line(run([*DRCTL, "runbook", "validate", text_then_binary]), 2, "not UTF-8")
    assert said.startswith(f"{text_then_binary}:3: "), said
    for cmd in (["status", "--config", missing], ["runbook", "validate", missing]):
        one_line(run([*DRCTL, *cmd]), 2, missing, "No such file")
    for cmd in (["agent", "--site", "east", "--config", workdir], ["drill", "app",
                                                                    "--runbook", workdir]):
        one_line(run([*DRCTL, *cmd]), 2, workdir, "directory")


def test_bad_etcd_endpoints_and_unknown_names(workdir: str, cluster_yaml: str) -> None:
    with open(cluster_yaml) as fh:
        cfg = json.load(fh)
    for endpoint, words in (("http://127.0.0.1:2379", ["without a scheme"]),
                            ("127.0.0.1:99999", ["out of range"])):
        path = os.path.join(workdir, "bad-etcd.yaml")
        with open(path, "w") as fh:
            json.dump({**cfg, "etcd": [endpoint]}, fh)
        one_line(run([*DRCTL, "status", "--config", path]), 2, "[config]", "etcd", *words)
    # an etcd nobody runs: a prompt answer, not a wait
    one_line(run([*DRCTL, "status", "--config", cluster_yaml], timeout=30), 69,
             "[store_unavailable]", "etcd unreachable")
    one_line(run([*DRCTL, "agent", "--config", cluster_yaml, "--site", "north"]), 2,
             "--site north", "sites: east, west")
    one_line(run([*DRCTL, "failover", "app", "--config", cluster_yaml, "--to", "north"]), 2,
             "--to north: unknown site (sites: east, west)")
    one_line(run([*DRCTL, "failover", "nosvc", "--config", cluster_yaml]), 2, "'nosvc'")
    example = os.path.join(REPO, "runbooks", "examples", "two-site-web.yaml")
    one_line(run([*DRCTL, "runbook", "plan", example, "nosvc"]), 2, "'nosvc'")


def test_an_etcd_endpoint_that_is_not_etcd(workdir: str, cluster_yaml: str) -> None:
    """A gRPC server without etcd's services answers 'method not found': one line, not a
    traceback."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with open(cluster_yaml) as fh:
            cfg = json.load(fh)
        path = os.path.join(workdir, "not-etcd.yaml")
        with open(path, "w") as fh:
            json.dump({**cfg, "etcd": [f"127.0.0.1:{port}"]}, fh)
        one_line(run([*DRCTL, "status", "--config", path], timeout=30), 69,
                 "[store_unavailable]", f"etcd at 127.0.0.1:{port} does not serve etcd's v3 API")
    finally:
        server.stop(None)


def test_status_reads_no_tsig_key(workdir: str, cluster_yaml: str) -> None:
    """Commands that only read or write etcd (status, audit, a failover request) read no TSIG
    key: a key file this host does not have (an operator's laptop) stops only the controller,
    which signs the DNS updates."""
    with open(cluster_yaml) as fh:
        cfg = json.load(fh)
    missing = os.path.join(workdir, "no-such-tsig.key")
    cfg["services"]["app"]["dns"] = {"zone": "dr.test", "name": "app",
                                     "servers": ["127.0.0.1:53"],
                                     "tsig": {"name": "dr-updater", "file": missing}}
    path = os.path.join(workdir, "with-dns.yaml")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    for cmd in (["status"], ["audit", "show"], ["failover", "app"]):  # past the
        # configuration: etcd is down
        one_line(run([*DRCTL, *cmd, "--config", path], timeout=30), 69,
                 "[store_unavailable]", "etcd unreachable")
    one_line(run([*DRCTL, "controller", "--config", path]), 2, "[config]", missing,
             "No such file")
    # a key written wrong is still refused: both file: and env:
    cfg["services"]["app"]["dns"]["tsig"]["env"] = "TSIG_SECRET"
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    one_line(run([*DRCTL, "status", "--config", path]), 2, "[config]",
             "give exactly one of file: or env:")


# -- a reader that goes away ----------------------------------------------------------------


def test_status_json_into_a_closed_pipe_exits_quietly(workdir: str) -> None:
    from tests.services import EtcdServer

    etcd = EtcdServer().start()
    try:
        path = os.path.join(workdir, "c.yaml")
        with open(path, "w") as fh:
            json.dump({"cluster": "pipe", "etcd": etcd.etcd_config(),
                       "sites": {s: {"address": f"10.0.0.{i}"}
                                 for i, s in enumerate(("east", "west"), 1)},
                       "services": {f"s{i}": {"primary": "east", "replica": "west"}
                                    for i in range(50)}}, fh)
        for cmd in (["status", "--config", path, "--json"], ["runbook", "schema"]):
            read, write = os.pipe()
            os.close(read)  # `| head` that has already gone
            try:
                p = subprocess.run([*DRCTL, *cmd], stdout=write, stderr=subprocess.PIPE,
                                   text=True, cwd=REPO, timeout=60)
            finally:
                os.close(write)
            assert p.returncode == 141 and p.stderr == "", (cmd, p.returncode, p.stderr)
    finally:
        etcd.stop()


# -- a new user's trial: each mistake one line, the problem named ---------------------------


def test_users_file_in_a_directory_that_does_not_exist(workdir: str) -> None:
    missing = os.path.join(workdir, "nonexistent", "dir", "u.json")
    one_line(run([*DRCTL, "api", "users", "add", "alice", "--role", "operator", "--file",
                  missing]), 2, "[users_file]", missing, "cannot write",
             f"directory {os.path.dirname(missing)} does not exist")
    assert not os.path.exists(os.path.join(workdir, "nonexistent"))


def _api(cluster_yaml: str, workdir: str, *flags: str) -> list[str]:
    token = os.path.join(workdir, "token")
    with open(token, "w") as fh:
        fh.write("a-token-long-enough-for-the-api")
    return [*DRCTL, "api", "--config", cluster_yaml, "--token-file", token, *flags]


def test_api_listen_on_a_name_that_does_not_resolve(workdir: str, cluster_yaml: str,
                                                    deployment: Pki) -> None:
    tls = ["--tls-cert", os.path.join(deployment.dir, "sites", "west.crt"),
           "--tls-key", os.path.join(deployment.dir, "sites", "west.key")]
    one_line(run(_api(cluster_yaml, workdir, "--listen", "nosuchhost.invalid:18444", *tls)),
             2, "--listen nosuchhost.invalid:18444", "cannot listen there",
             "cannot resolve 'nosuchhost.invalid'")
    one_line(run([*DRCTL, "controller", "--config", cluster_yaml, "--metrics-listen",
                  "nosuchhost.invalid:18445"]), 2, "--metrics-listen nosuchhost.invalid",
             "cannot resolve")


def test_api_tls_files_that_cannot_be_used(workdir: str, cluster_yaml: str,
                                           deployment: Pki) -> None:
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    cert, key = (os.path.join(workdir, "nope.crt"), os.path.join(workdir, "nope.key"))
    one_line(run(_api(cluster_yaml, workdir, *listen, "--tls-cert", cert, "--tls-key", key)),
             2, f"--tls-cert {cert}: No such file", f"--tls-key {key}: No such file")
    garbage = os.path.join(workdir, "garbage.crt")
    with open(garbage, "w") as fh:
        fh.write("not a certificate\n")
    west_crt = os.path.join(deployment.dir, "sites", "west.crt")
    west_key = os.path.join(deployment.dir, "sites", "west.key")
    said = one_line(run(_api(cluster_yaml, workdir, *listen, "--tls-cert", garbage,
                             "--tls-key", west_key)), 2,
                    f"--tls-cert {garbage}: not a PEM certificate (or the key does not match)")
    assert "_ssl.c" not in said and "PEM lib" not in said
    one_line(run(_api(cluster_yaml, workdir, *listen, "--tls-cert", west_crt, "--tls-key",
                      os.path.join(deployment.dir, "sites", "east.key"))), 2,
             "--tls-key", "east.key", "not the private key of --tls-cert")


def test_push_once_gives_up_on_a_stopped_target_by_default(workdir: str, deployment: Pki,
                                                           volume: str) -> None:
    """`push --once` is a one-shot command: like verify it gives up after 10 s (exit 69,
    one line) instead of waiting forever; a running agent waits, and says it does."""
    agent = Proc(push(deployment, volume, os.path.join(workdir, "agent-state")),
                 os.path.join(workdir, "agent.log")).start()
    started = time.monotonic()
    p = run(push(deployment, volume, os.path.join(workdir, "state"), "--once"), timeout=60)
    one_line(p, 69, "[target_unavailable]", "no connection within 10s", "Connection refused")
    assert time.monotonic() - started < 40
    wait_for(lambda: "waiting for target" in agent.log(), 30, "the agent to say it waits")
    assert agent.popen is not None and agent.popen.poll() is None, agent.log()
    assert "until it answers" in agent.log() and "Traceback" not in agent.log()
    agent.stop()


@pytest.mark.parametrize(("argv", "flag", "command"), [
    (["--bogus"], "--bogus", "drctl"),
    (["status", "--bogus"], "--bogus", "drctl status"),
    (["--bogus", "status"], "--bogus", "drctl"),
    (["replicate", "push", "v.img", "--bogus"], "--bogus", "drctl replicate push"),
    (["api", "users", "add", "ann", "--bogus=1"], "--bogus=1", "drctl api users add"),
    (["status", "--config", "c.yaml", "--bogus"], "--bogus", "drctl status"),
])
def test_an_unknown_flag_is_named_before_what_is_missing(argv: list[str], flag: str,
                                                         command: str) -> None:
    said = one_line(run([*DRCTL, *argv]), 2, "[usage]")
    assert said == (f"drctl: error [usage]: unrecognized arguments: {flag} "
                    f"(see: {command} --help)"), said


@pytest.mark.parametrize(("argv", "said"), [
    (["stauts"], "unknown command 'stauts'; did you mean 'status'? (see: drctl --help)"),
    # its flags are unknown to drctl itself: the command is what is wrong, not the flag
    (["stauts", "--config", "c.yaml"], "unknown command 'stauts'; did you mean 'status'? "
     "(see: drctl --help)"),
    (["replicate", "veriffy", "--to", "x"], "unknown command 'veriffy'; did you mean "
     "'verify'? (see: drctl replicate --help)"),
    (["replicate", "serve", "--mode", "xyz"], "argument --mode: invalid choice: 'xyz' (choose "
     "from 'hot', 'warm') (see: drctl replicate serve --help)"),
])
def test_a_misspelt_command_is_named_with_what_was_meant(argv: list[str], said: str) -> None:
    assert one_line(run([*DRCTL, *argv]), 2) == f"drctl: error [usage]: {said}"


def test_a_negative_value_is_judged_as_the_flags_value() -> None:
    """argparse reads "-1s" after --interval as a flag of its own: the error is the flag's
    check of the value, as with --interval=-1s, not "unrecognized arguments: -1s"."""
    push = ["replicate", "push", "v.img", "--to", "127.0.0.1:7400", "--volume", "v"]
    for flags in (["--interval", "-1s"], ["--interval=-1s"]):
        said = one_line(run([*DRCTL, *push, *flags]), 2, "[usage]")
        assert said == ("drctl: error [usage]: argument --interval: expected seconds > 0, got "
                        "'-1s' (see: drctl replicate push --help)"), said
    one_line(run([*DRCTL, *push, "--rate-limit", "-5MB/s"]), 2, "argument --rate-limit:",
             "-5MB")
    # a dash and a digit with no flag before it that takes a value: still unrecognized
    one_line(run([*DRCTL, *push, "--once", "-5"]), 2, "unrecognized arguments: -5")


def test_every_address_flag_says_the_same(workdir: str, cluster_yaml: str,
                                          deployment: Pki) -> None:
    runbook = os.path.join(REPO, "runbooks", "examples", "two-site-web.yaml")
    commands = (
        ["api", "--config", cluster_yaml, "--listen", "A"],
        ["controller", "--config", cluster_yaml, "--metrics-listen", "A"],
        ["replicate", "serve", "--listen", "A", "--dir", workdir, *deployment.flags("west")],
        ["replicate", "push", "v.img", "--volume", "db", "--to", "A"],
        ["replicate", "verify", "v.img", "--volume", "db", "--to", "A"],
        ["agent", "--config", cluster_yaml, "--site", "east", "--metrics-listen", "A"],
        ["deploy", "systemd", "--config", runbook, "--api", "A"],
    )
    cases = [(cmd, "127.0.0.1:80000", "port 80000 out of range (1..65535)")
             for cmd in commands]
    cases += [(commands[0], ":8080", "expected HOST:PORT"),
              (commands[-1], "nowhere", "expected HOST:PORT")]
    for cmd, address, words in cases:
        said = one_line(run([*DRCTL, *(address if a == "A" else a for a in cmd)]), 2)
        flag = cmd[cmd.index("A") - 1]
        assert f"[usage]: argument {flag}: invalid address {address!r}: {words}" in said, said


def test_demo_settings_that_make_no_sense_start_nothing() -> None:
    for variable, value, words in (
            ("DEMO_SECONDS", "abc", "expected seconds >= 0"),
            ("DEMO_SECONDS", "-5", "expected seconds >= 0"),
            ("DEMO_CYCLE", "maybe", "expected 1 (run the scripted lifecycle; the default) "
                                    "or 0 (skip it)")):
        p = run([*DRCTL[:-1], "drctl.demo"], timeout=30, env={variable: value})
        one_line(p, 2, "[usage]", f"{variable}={value!r}", words)
        assert p.stdout == "", p.stdout  # nothing started
