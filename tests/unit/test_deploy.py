"""`drctl deploy systemd`: units for every host of the example runbooks, checked by
`systemd-analyze verify` where it is installed, and their ExecStart lines by drctl's own
parser."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from drctl.cli import build_parser, main
from drctl.deploy import CHILD_STOP, sd_quote

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "runbooks", "examples", "*.yaml")))
DRCTL = shutil.which("drctl") or os.path.join(os.path.dirname(sys.executable), "drctl")


def generate(out: str, *args: str) -> dict[str, str]:
    assert main(["deploy", "systemd", "--drctl", DRCTL, "--out", out, *args]) == 0
    files = {}
    for name in os.listdir(out):
        with open(os.path.join(out, name), encoding="utf-8") as fh:
            files[name] = fh.read()
    return files


def service(text: str) -> dict[str, list[str]]:
    """The [Service] section's settings, each key's values in order."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def hosts() -> list[tuple[str, list[str]]]:
    from runbooks.loader import load

    out = []
    for path in EXAMPLES:
        rb = load(path)
        out += [(path, ["--site", s]) for s, site in rb.sites.items() if site.data_dir]
        out.append((path, ["--witness"]))
    return out


@pytest.mark.parametrize(("runbook", "where"), hosts(),
                         ids=[f"{os.path.basename(p)}:{w[-1]}" for p, w in hosts()])
def test_units_verify_and_parse(tmp_path: str, runbook: str, where: list[str]) -> None:
    files = generate(str(tmp_path), "--config", runbook, *where, "--api", "127.0.0.1:8443",
                     "--controller-metrics", "0.0.0.0:9500")
    units = sorted(n for n in files if n.endswith(".service"))
    expect = {"drctl-controller.service", "drctl-api.service"}
    if where[0] == "--site":
        expect.add("drctl-agent.service")
    assert set(units) == expect
    funcs = {"drctl-agent.service": "cmd_agent", "drctl-controller.service": "cmd_controller",
             "drctl-api.service": "cmd_api"}
    for unit in units:
        s = service(files[unit])
        argv = shlex.split(s["ExecStart"][0].replace("%%", "%"))
        assert argv[0] == os.path.abspath(DRCTL)
        assert build_parser().parse_args(argv[1:]).func.__name__ == funcs[unit]
        assert s["KillMode"] == ["mixed"] and s["Restart"] == ["always"]
        # exit status 2 is also "cannot listen there" (an address not assigned yet at boot):
        # no exit status may keep a daemon down for good
        assert "RestartPreventExitStatus" not in s
        assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
        assert s["PrivateTmp"] == ["yes"] and s["User"] == ["drctl"]
        assert "EnvironmentFile=-/etc/drctl/drctl.env" in files[unit]
        assert s["WorkingDirectory"] == [os.path.dirname(runbook)]
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze not installed: the units' keys and values are not "
                    "verified by systemd")
    r = subprocess.run([verify, "verify", *(os.path.join(tmp_path, u) for u in units)],
                       capture_output=True, text=True, cwd=tmp_path)
    # unknown keys and bad values are reported on stderr with exit status 0
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_agent_unit_writes_where_the_data_path_writes(tmp_path: str) -> None:
    web = os.path.join(ROOT, "runbooks", "examples", "two-site-web.yaml")
    files = generate(str(tmp_path), "--config", web, "--site", "west", "--no-controller",
                     "--agent-metrics", "10.0.0.2:9410")
    assert sorted(files) == ["drctl-agent.service", "drctl.sysusers.conf",
                             "drctl.tmpfiles.conf"]
    s = service(files["drctl-agent.service"])
    # data_dir /var/lib/drctl is the StateDirectory; the volumes' files are in /srv/db, /srv/app
    assert s["StateDirectory"] == ["drctl"]
    assert s["ReadWritePaths"] == ["-/srv/app -/srv/db"]
    # the agent stops each child (two capture agents at most, the target) before it exits
    assert int(s["TimeoutStopSec"][0]) > CHILD_STOP * 3
    assert "--metrics-listen 10.0.0.2:9410" in s["ExecStart"][0]
    assert "systemctl start postgresql" in files["drctl-agent.service"]  # its hooks, named
    assert "d /srv/db 0750 drctl drctl -" in files["drctl.tmpfiles.conf"]
    assert "SupplementaryGroups" not in s and s["ProtectClock"] == ["yes"]


def test_block_device_volumes_need_the_disk_group(tmp_path: str) -> None:
    three = os.path.join(ROOT, "runbooks", "examples", "three-site.yaml")
    files = generate(str(tmp_path), "--config", three, "--site", "fra")
    s = service(files["drctl-agent.service"])
    assert s["SupplementaryGroups"] == ["disk"]
    assert "ProtectClock" not in s  # it implies a device allow-list: no block devices
    assert "ReadWritePaths" not in s  # /dev stays writable under ProtectSystem=strict
    assert "m drctl disk" in files["drctl.sysusers.conf"]
    # the etcd password is a file the runbook names: named in a comment, never inlined
    assert "/etc/drctl/etcd.password" in files["drctl-agent.service"]


def test_secrets_by_variable_go_in_the_environment_file(tmp_path: str) -> None:
    warm = os.path.join(ROOT, "runbooks", "examples", "warm-site.yaml")
    files = generate(str(tmp_path), "--config", warm, "--witness", "--env-file",
                     "/etc/drctl/archive.env")
    unit = files["drctl-controller.service"]
    assert "# /etc/drctl/archive.env (root's, mode 0600) sets DRCTL_TSIG_ARCHIVE." in unit
    assert "EnvironmentFile=-/etc/drctl/archive.env" in unit
    assert "drctl-agent.service" not in files


@pytest.mark.parametrize(("args", "message"), [
    (["--site", "nowhere"], "--site nowhere: not in"),
    (["--site", "east", "--api", "8443"],
     "argument --api: invalid address '8443': expected HOST:PORT"),  # drctl/argtypes.py
    (["--agent-metrics", "h:70000"], "argument --agent-metrics: invalid address 'h:70000': "
                                     "port 70000 out of range"),
])
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    web = os.path.join(ROOT, "runbooks", "examples", "two-site-web.yaml")
    try:
        code = main(["deploy", "systemd", "--config", web, *args])
    except SystemExit as exc:  # the parser's refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_sd_quote() -> None:
    assert sd_quote("/etc/drctl/runbook.yaml") == "/etc/drctl/runbook.yaml"
    assert sd_quote("/srv/my volume") == '"/srv/my volume"'
    assert sd_quote("50%") == "50%%"
    assert sd_quote("$HOME") == "$$HOME"
    assert sd_quote('a"b') == '"a\\"b"'
