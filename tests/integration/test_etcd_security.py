"""etcd with TLS and authentication (as every EtcdServer the tests start): drctl gets in with
the credentials of its configuration, and is refused without them, with a wrong password,
without the CA or with another CA: at once, in one line ("etcd at HOST:PORT refused the
request: ..."), exit code 77, never a traceback. Credentials that cannot be used (a password
file others can read, an unset variable) stop at load time with file:line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from failover.coordination.credentials import CredentialsError, EtcdCredentials
from failover.coordination.etcd import EtcdStore
from failover.errors import StoreRefusedError, StoreUnavailableError
from tests.procs import DRCTL, REPO, run
from tests.services import EtcdServer


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that did not sign etcd's certificate."""
    from drctl import pki

    return pki.init(str(tmp_path_factory.mktemp("other-ca")), "other").ca_cert


def _secret(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def _refused(etcd: EtcdServer, reason: str) -> str:
    return f"etcd at 127.0.0.1:{etcd.client_port} refused the request: {reason}"


def _cases(etcd: EtcdServer, workdir: str, other_ca: str) -> dict[str, tuple[Any, str]]:
    """name: (the etcd: value of a configuration, the reason etcd's refusal names)."""
    sec = etcd.security
    assert sec is not None
    ep = [f"127.0.0.1:{etcd.client_port}"]
    wrong = _secret(os.path.join(workdir, "wrong.password"), "not-the-password\n")
    return {
        "no credentials": (ep, "it speaks TLS only"),
        "TLS without a user": ({"endpoints": ep, "ca": sec.ca}, "authentication required"),
        "wrong password": ({"endpoints": ep, "user": "drctl", "password_file": wrong,
                            "ca": sec.ca}, "authentication failed for user 'drctl'"),
        "without the CA": ({"endpoints": ep, "user": "drctl",
                            "password_file": sec.password_file}, "it speaks TLS only"),
        "another CA": ({"endpoints": ep, "user": "drctl", "password_file": sec.password_file,
                        "ca": other_ca}, "etcd's certificate is not signed by a CA we trust"),
    }


def _store_for(value: Any, endpoint: tuple[str, int]) -> EtcdStore:
    if isinstance(value, list):
        return EtcdStore([endpoint], timeout=2.0)
    fields = {k: v for k, v in value.items() if k != "endpoints"}
    return EtcdStore([endpoint], timeout=2.0, credentials=EtcdCredentials(**fields))


async def test_the_store_is_refused_at_once_in_one_line(etcd: EtcdServer, workdir: str,
                                                        other_ca: str) -> None:
    for name, (value, reason) in _cases(etcd, workdir, other_ca).items():
        store = _store_for(value, etcd.endpoint)
        t0 = time.monotonic()
        try:
            with pytest.raises(StoreRefusedError) as info:
                await store.put("/drctl/sec/x", b"1")
        finally:
            await store.close()
        message = str(info.value)
        assert message.startswith(_refused(etcd, reason)), (name, message)
        assert "\n" not in message, name
        assert time.monotonic() - t0 < 1.5, f"{name}: refused only after retrying"
        assert info.value.exit_code == 77
        # to a running daemon a refusal is etcd out of reach: it fences or steps down
        assert isinstance(info.value, StoreUnavailableError)


async def test_with_its_credentials_drctl_gets_in_but_only_under_drctl(
        etcd: EtcdServer) -> None:
    store = EtcdStore([etcd.endpoint], timeout=2.0, credentials=etcd.credentials())
    try:
        rev = await store.put("/drctl/sec/ok", b"1")
        assert (await store.snapshot("/drctl/sec/")).revision >= rev
        with pytest.raises(StoreRefusedError, match="permission denied for user 'drctl'"):
            await store.put("/elsewhere", b"1")
    finally:
        await store.close()


def _config(workdir: str, name: str, etcd_value: Any) -> str:
    path = os.path.join(workdir, f"{name.replace(' ', '-')}.yaml")
    with open(path, "w") as fh:
        json.dump({"cluster": "sec", "etcd": etcd_value,
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west"}}}, fh, indent=1)
    return path


def _one_line_error(p: Any, code: int, expected: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], p.stderr


def test_every_refusal_is_one_line_and_exit_77_from_the_cli(etcd: EtcdServer, workdir: str,
                                                            other_ca: str) -> None:
    for name, (value, reason) in _cases(etcd, workdir, other_ca).items():
        path = _config(workdir, name, value)
        p = run([*DRCTL, "status", "--config", path], timeout=30)
        _one_line_error(p, 77, f"drctl: error [store_refused]: {_refused(etcd, reason)}")
    p = run([*DRCTL, "status", "--config", _config(workdir, "good", etcd.etcd_config())])
    assert p.returncode == 0 and "service app: unprotected" in p.stdout, p.stderr


def test_daemons_with_a_wrong_password_stop_at_once(etcd: EtcdServer, workdir: str) -> None:
    """The controller and an agent check etcd's answer before they start: they exit 77 in
    one line rather than retry forever (an unreachable etcd is still waited for)."""
    value = dict(etcd.etcd_config())  # type: ignore[arg-type]
    del value["password_file"]
    value["password_env"] = "DRCTL_TEST_ETCD_PASSWORD"
    path = _config(workdir, "env", value)
    env = {**os.environ, "DRCTL_TEST_ETCD_PASSWORD": "wrong"}
    for cmd in (["controller", "--config", path], ["agent", "--config", path, "--site", "east"]):
        p = subprocess.run([*DRCTL, *cmd], capture_output=True, text=True, timeout=30, cwd=REPO,
                           env=env)
        _one_line_error(p, 77, _refused(etcd, "authentication failed for user 'drctl'"))


def test_unusable_credentials_stop_at_load_time(etcd: EtcdServer, workdir: str) -> None:
    sec = etcd.security
    assert sec is not None
    ep = [f"127.0.0.1:{etcd.client_port}"]
    loose = _secret(os.path.join(workdir, "loose.password"), sec.password, 0o644)
    cases = {
        "readable by others": ({"endpoints": ep, "user": "drctl", "password_file": loose,
                                "ca": sec.ca}, "etcd.password_file: " + loose +
                               " has mode 0644: group or others can read it, refused"),
        "unset variable": ({"endpoints": ep, "user": "drctl", "password_env": "DRCTL_UNSET_X",
                            "ca": sec.ca}, "etcd.password_env: environment variable "
                                           "DRCTL_UNSET_X is not set"),
        "inline password": ({"endpoints": ep, "user": "drctl", "password": "x", "ca": sec.ca},
                            "etcd.password: inline passwords are not allowed"),
        "password in clear": ({"endpoints": ["10.9.9.9:2379"], "user": "drctl",
                               "password_file": sec.password_file},
                              "etcd.user: a password without TLS would cross the network"),
        "cert without key": ({"endpoints": ep, "cert": sec.client_cert},
                             "etcd.key: cert: and key: come together"),
    }
    for name, (value, expected) in cases.items():
        path = _config(workdir, name, value)
        p = run([*DRCTL, "status", "--config", path], timeout=30)
        _one_line_error(p, 2, f"{path}:")
        assert expected in p.stderr, (name, p.stderr)
    with pytest.raises(CredentialsError, match="has mode 0644"):
        EtcdCredentials("drctl", loose, ca=sec.ca).resolved()


def test_a_runbook_takes_the_same_mapping(etcd: EtcdServer, workdir: str) -> None:
    path = os.path.join(workdir, "runbook.yaml")
    with open(path, "w") as fh:
        json.dump({"kind": "drctl-runbook", "version": 1, "cluster": "sec",
                   "etcd": etcd.etcd_config(),
                   "sites": {"east": {"address": "10.0.0.1"}, "west": {"address": "10.0.0.2"}},
                   "services": {"app": {"primary": "east", "replica": "west",
                                        "steps": [{"type": "promote"}]}}}, fh)
    p = run([*DRCTL, "runbook", "validate", path])
    assert p.returncode == 0, p.stderr
    p = run([*DRCTL, "status", "--config", path], timeout=30)
    assert p.returncode == 0 and "service app: unprotected" in p.stdout, p.stderr


def test_client_certificates_when_etcd_requires_them(workdir: str) -> None:
    """etcd --client-cert-auth: cert: and key: get drctl in; without them the TLS session
    ends and that is a refusal too."""
    server = EtcdServer(client_cert_auth=True).start()
    try:
        good = server.etcd_config()
        p = run([*DRCTL, "status", "--config", _config(workdir, "mtls", good)], timeout=30)
        assert p.returncode == 0, p.stderr
        assert isinstance(good, dict)
        no_cert = {k: v for k, v in good.items() if k not in ("cert", "key")}
        p = run([*DRCTL, "status", "--config", _config(workdir, "no-cert", no_cert)], timeout=30)
        _one_line_error(p, 77, _refused(server, "etcd ended the TLS session"))
    finally:
        server.stop()


async def test_a_token_etcd_no_longer_knows_is_renewed(etcd: EtcdServer) -> None:
    """etcd forgets tokens (a restart, --auth-token-ttl of idleness): the next call fails with
    "invalid auth token"; the store fetches a new one and calls again, and a watch refused
    for the same reason (created cancelled) is resumed on a new stream."""
    store = EtcdStore([etcd.endpoint], timeout=5.0, credentials=etcd.credentials())
    try:
        start = await store.put("/drctl/sec/t/a", b"1")
        store.client.metadata = (("token", "forgotten.1"),)  # a token etcd does not know
        await store.put("/drctl/sec/t/b", b"2")
        assert store.client.token_generation == 1
        store.client._watcher._metadata = (("token", "forgotten.1"),)
        await store.client._watcher._terminate_stream(None)  # the next watch: a new stream
        got = []
        async for ev in store.watch("/drctl/sec/t/", start):
            got.append(ev.value)
            if len(got) == 2:
                break
        assert got == [b"1", b"2"] and store.client.token_generation == 2
    finally:
        await store.close()


async def test_drctl_carries_on_across_an_etcd_restart(etcd: EtcdServer) -> None:
    store = EtcdStore([etcd.endpoint], timeout=5.0, credentials=etcd.credentials())
    try:
        await store.put("/drctl/sec/before", b"1")
        etcd.kill9()
        etcd.start()
        await store.put("/drctl/sec/after", b"2")
        assert (await store.snapshot("/drctl/sec/after")).value("/drctl/sec/after") == b"2"
    finally:
        await store.close()
