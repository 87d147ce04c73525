"""RFC 2136 + TSIG against real named servers started by the tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from failover.dns.rfc2136 import DnsUpdater, RecordSet, Server, TsigKey
from failover.errors import DnsUpdateRefused, DnsVerifyTimeout, FailoverError
from tests.services import NamedServer


@pytest.fixture(scope="module")
def named() -> Iterator[NamedServer]:
    server = NamedServer().start()
    try:
        yield server
    finally:
        server.stop()


def _key(n: NamedServer) -> TsigKey:
    return TsigKey(n.key_name, n.secret)


async def test_replace_and_verify(named: NamedServer) -> None:
    up = DnsUpdater(_key(named))
    srv = Server("127.0.0.1", named.port)
    rr = RecordSet("dr.test", "app", "A", 5, ("10.0.0.2",))
    await up.replace(rr, [srv])
    await up.verify(rr, [srv], deadline=5)
    assert await up.answers(rr, srv) == frozenset({"10.0.0.2"})
    rr2 = RecordSet("dr.test", "app", "A", 5, ("10.0.0.3", "10.0.0.4"))
    await up.replace(rr2, [srv])
    await up.verify(rr2, [srv], deadline=5)


async def test_wrong_secret_is_refused(named: NamedServer) -> None:
    bad = TsigKey(named.key_name, "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=")
    rr = RecordSet("dr.test", "app", "A", 5, ("10.9.9.9",))
    with pytest.raises(DnsUpdateRefused, match=r"refused by 127\.0\.0\.1"):
        await DnsUpdater(bad).replace(rr, [Server("127.0.0.1", named.port)])
    good = DnsUpdater(_key(named))
    assert await good.answers(rr, Server("127.0.0.1", named.port)) != frozenset({"10.9.9.9"})


async def test_unknown_zone_is_refused(named: NamedServer) -> None:
    rr = RecordSet("other.test", "app", "A", 5, ("10.0.0.9",))
    with pytest.raises(DnsUpdateRefused, match=r"NOTAUTH|REFUSED"):
        await DnsUpdater(_key(named)).replace(rr, [Server("127.0.0.1", named.port)])


async def test_verify_names_the_server_that_lags(named: NamedServer) -> None:
    other = NamedServer().start()  # a second authoritative server that never got the update
    try:
        up = DnsUpdater(_key(named))
        rr = RecordSet("dr.test", "app", "A", 5, ("10.0.0.7",))
        await up.replace(rr, [Server("127.0.0.1", named.port)])
        with pytest.raises(DnsVerifyTimeout, match=rf"127\.0\.0\.1:{other.port} answers"):
            await up.verify(rr, [Server("127.0.0.1", named.port),
                                 Server("127.0.0.1", other.port)], deadline=0.5)
    finally:
        other.stop()


def test_key_material_from_file_and_env(tmp_path: object,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(str(tmp_path), "k.key")
    with open(path, "w") as fh:
        fh.write('key "dr-updater" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0";\n};\n')
    k = TsigKey.from_bind_file(path)
    assert (k.name, k.algorithm, k.secret) == ("dr-updater", "hmac-sha256", "c2VjcmV0")
    monkeypatch.setenv("DR_TSIG", "c2VjcmV0")
    assert TsigKey.from_env("dr-updater", "DR_TSIG").secret == "c2VjcmV0"
    with pytest.raises(FailoverError, match="DR_MISSING is not set"):
        TsigKey.from_env("dr-updater", "DR_MISSING")
    with pytest.raises(FailoverError, match="not base64"):
        TsigKey("k", "not base64!!")


async def test_every_record_of_a_service_is_rewritten_and_verified(named: NamedServer) -> None:
    """The dns step (failover/operation.py): each record on its update servers, each verified
    on its authoritative servers; one that does not converge stops the step, named."""
    from failover.config import DnsConfig
    from failover.operation import rewrite_dns

    srv = Server("127.0.0.1", named.port)

    def record(name: str, *servers: Server) -> DnsConfig:
        return DnsConfig(RecordSet("dr.test", name, "A", 5, ()), servers or (srv,), (srv,),
                         _key(named), verify_timeout=2)

    out = await rewrite_dns((record("svc1"), record("svc2")), "10.0.0.8")
    up = DnsUpdater(_key(named))
    for name in ("svc1", "svc2"):
        got = await up.answers(RecordSet("dr.test", name, "A", 5, ()), srv)
        assert got == frozenset({"10.0.0.8"}), name
    assert out.splitlines()[1].startswith("svc2.dr.test A -> 10.0.0.8: updated on ")
    other = NamedServer().start()  # authoritative too, but never sent the update
    try:
        with pytest.raises(DnsVerifyTimeout, match=rf"127\.0\.0\.1:{other.port} answers"):
            await rewrite_dns((record("svc3"), record("svc4", srv, Server("127.0.0.1",
                                                                          other.port))),
                              "10.0.0.9")
        assert await up.answers(RecordSet("dr.test", "svc3", "A", 5, ()), srv) == \
            frozenset({"10.0.0.9"})
    finally:
        other.stop()


def test_named_moves_to_another_port_when_its_port_is_taken() -> None:
    """Another process binding the picked port before named does (named then runs without
    listening there): the fixture starts it again elsewhere instead of failing a test later."""
    import socket

    from drctl.localservers import NamedServer

    ns = NamedServer()
    taken = ns.port
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))  # bound, not listening: connections are refused
    try:
        ns.start()
        try:
            assert ns.port != taken
            socket.create_connection(("127.0.0.1", ns.port), timeout=2).close()
        finally:
            ns.stop()
    finally:
        blocker.close()
