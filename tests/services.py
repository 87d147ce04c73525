"""The real servers of drctl.localservers, with a missing binary turned into a test skip."""

from __future__ import annotations

import shutil

import pytest

from drctl import localservers
from drctl.localservers import EtcdCluster, EtcdServer, NamedServer, PrometheusServer


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (scripts/install-deps.sh installs it)")
    return path


localservers.require = _require

__all__ = ["EtcdCluster", "EtcdServer", "NamedServer", "PrometheusServer"]
