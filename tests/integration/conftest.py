"""Fixtures the integration tests share: a real etcd (TLS + auth) and a real named, each on
free loopback ports in a temp dir, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import EtcdServer, NamedServer


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    s = EtcdServer().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def named() -> Iterator[NamedServer]:
    s = NamedServer().start()
    try:
        yield s
    finally:
        s.stop()
