"""The ``etcd:`` of a cluster.yaml or a runbook: a list, or a mapping with credentials; the
rules checked without etcd (files and variables read at load time, never printed)."""

from __future__ import annotations

import json
import os

import pytest

from failover.config import ConfigError
from failover.config import load as load_cluster
from failover.coordination.credentials import CredentialsError, EtcdCredentials, parse
from runbooks.cluster import to_cluster
from runbooks.loader import RunbookError
from runbooks.loader import load as load_runbook


def _secret(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def test_a_list_is_endpoints_alone() -> None:
    endpoints, creds, problems = parse(["10.0.0.1:2379"])
    assert endpoints == ["10.0.0.1:2379"] and creds.anonymous and not problems


@pytest.mark.parametrize(("value", "key", "message"), [
    ({"endpoints": ["a:1"], "user": "u"}, "user", "exactly one of password_file"),
    ({"endpoints": ["a:1"], "user": "u", "password_file": "f", "password_env": "V", "ca": "c"},
     "user", "exactly one of password_file"),
    ({"endpoints": ["a:1"], "password_env": "V", "ca": "c"}, "user", "needs a user"),
    ({"endpoints": ["a:1"], "user": "u", "password": "x", "ca": "c"}, "password",
     "inline passwords are not allowed"),
    ({"endpoints": ["a:1"], "cert": "c"}, "key", "cert: and key: come together"),
    ({"endpoints": ["a:1"], "tls": True}, "tls", "unknown key"),
    ({"user": "u", "password_env": "V", "ca": "c"}, None, "non-empty list of HOST:PORT"),
    ({"endpoints": ["10.0.0.1:2379"], "user": "u", "password_env": "V"}, "user",
     "cross the network in clear"),
    ({"endpoints": ["a:1"], "ca": 3}, "ca", "non-empty string"),
])
def test_rules_between_fields(value: dict[str, object], key: str | None, message: str) -> None:
    problems = parse(value)[2]
    assert any(k == key and message in m for k, m in problems), problems


def test_a_password_in_clear_is_allowed_on_loopback_only() -> None:
    for hosts in (["127.0.0.1:2379", "localhost:2379"], ["[::1]:2379"]):
        assert not parse({"endpoints": hosts, "user": "u", "password_env": "V"})[2]


def test_secrets_are_read_checked_and_never_printed(tmp_path: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path)
    good = _secret(os.path.join(d, "pw"), "s3cret\n")
    creds = EtcdCredentials("drctl", good).resolved()
    assert creds.password == "s3cret" and "s3cret" not in repr(creds)
    loose = _secret(os.path.join(d, "loose"), "s3cret", 0o640)
    with pytest.raises(CredentialsError, match="mode 0640: group or others") as info:
        EtcdCredentials("drctl", loose).resolved()
    assert info.value.field == "password_file" and info.value.exit_code == 2
    with pytest.raises(CredentialsError, match="is empty"):
        EtcdCredentials("drctl", _secret(os.path.join(d, "empty"), "\n")).resolved()
    monkeypatch.setenv("DRCTL_T_PW", "from-env")
    assert EtcdCredentials("drctl", password_env="DRCTL_T_PW").resolved().password == "from-env"
    with pytest.raises(CredentialsError, match="DRCTL_T_UNSET is not set"):
        EtcdCredentials("drctl", password_env="DRCTL_T_UNSET").resolved()
    with pytest.raises(CredentialsError, match="not a PEM certificate"):
        EtcdCredentials(ca=good).resolved()
    cert = _secret(os.path.join(d, "cert"), "-----BEGIN CERTIFICATE-----\n", 0o644)
    key = _secret(os.path.join(d, "key"), "-----BEGIN PRIVATE KEY-----\n", 0o644)
    with pytest.raises(CredentialsError, match="mode 0644") as info:
        EtcdCredentials(cert=cert, key=key).resolved()
    assert info.value.field == "key"


def test_cluster_yaml_errors_name_the_line(tmp_path: object) -> None:
    d = str(tmp_path)
    loose = _secret(os.path.join(d, "pw"), "x", 0o644)
    path = os.path.join(d, "c.yaml")
    with open(path, "w") as fh:
        fh.write("cluster: c\netcd:\n  endpoints: [127.0.0.1:2379]\n  user: drctl\n"
                 f"  password_file: {loose}\nsites: {{a: {{address: 10.0.0.1}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert str(info.value).startswith(f"{path}:5: etcd.password_file: {loose} has mode 0644")
    os.chmod(loose, 0o600)
    cfg = load_cluster(path)
    assert cfg.etcd == (("127.0.0.1", 2379),) and cfg.etcd_credentials.password == "x"


def test_runbook_validation_reads_no_file_its_use_does(tmp_path: object) -> None:
    d = str(tmp_path)
    path = os.path.join(d, "rb.yaml")
    missing = os.path.join(d, "nope")
    with open(path, "w") as fh:
        json.dump({"kind": "drctl-runbook", "version": 1, "cluster": "c",
                   "etcd": {"endpoints": ["127.0.0.1:2379"], "user": "drctl",
                            "password_file": missing},
                   "sites": {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"}},
                   "services": {"s": {"primary": "a", "replica": "b",
                                      "steps": [{"type": "promote"}]}}}, fh)
    rb = load_runbook(path)  # valid: the password file is read when the runbook is used
    assert rb.etcd == ("127.0.0.1:2379",) and rb.etcd_credentials.password_file == missing
    with pytest.raises(ConfigError, match=f"etcd.password_file: {missing}: No such file"):
        to_cluster(rb)
    with open(path, "w") as fh:
        json.dump({"kind": "drctl-runbook", "version": 1, "cluster": "c",
                   "etcd": {"endpoints": ["nohostport"], "user": "drctl"},
                   "sites": {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"}},
                   "services": {"s": {"primary": "a", "replica": "b",
                                      "steps": [{"type": "promote"}]}}}, fh)
    with pytest.raises(RunbookError) as info:
        load_runbook(path)
    assert any("etcd.endpoints: invalid address 'nohostport': expected HOST:PORT" in e
               for e in info.value.errors), info.value.errors
    assert any("etcd.user: give exactly one of" in e for e in info.value.errors)
