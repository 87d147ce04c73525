"""`make`'s venv target: a stamp inside the venv (written by scripts/install-deps.sh, last),
not the interpreter, whose symlink `touch` would follow out of the project."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _dry_run(venv: str, target: str = "demo") -> str:
    return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=60).stdout


def test_install_runs_only_without_a_fresh_stamp(tmp_path: str) -> None:
    venv = os.path.join(tmp_path, "venv")
    os.makedirs(os.path.join(venv, "bin"))
    assert "install-deps.sh" in _dry_run(venv)  # never installed
    stamp = os.path.join(venv, ".deps-stamp")
    with open(stamp, "w"):
        pass  # as install-deps.sh leaves it: newer than pyproject.toml and the script
    out = _dry_run(venv)
    assert "install-deps.sh" not in out and "drctl.demo" in out
    assert "touch" not in out  # nothing outside the venv's stamp is touched
    os.utime(stamp, (1, 1))  # older than pyproject.toml: install again
    assert "install-deps.sh" in _dry_run(venv)


def test_make_never_touches_the_interpreter() -> None:
    with open(os.path.join(ROOT, "Makefile")) as fh:
        makefile = fh.read()
    assert "touch $(PY)" not in makefile
    with open(os.path.join(ROOT, "scripts", "install-deps.sh")) as fh:
        script = fh.read().splitlines()
    stamp = [i for i, line in enumerate(script) if line.strip() == 'touch "$VENV/.deps-stamp"']
    assert stamp, "install-deps.sh does not write the stamp"
    # written after the last install step (pip, compileall): a failed run leaves none
    assert all(i < stamp[0] for i, line in enumerate(script)
               if "pip\" install" in line or "compileall" in line)
