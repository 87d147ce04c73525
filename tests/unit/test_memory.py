"""drctl.memory: the allocator keeps data-path buffers in the heap (glibc), and an operator's
own MALLOC_* settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import os, sys, threading
from drctl.memory import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def faults():
    with open("/proc/self/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])  # minflt
data = os.urandom(1 << 20)
def work():  # what the data path does with a batch: copies of 1-1.3 MiB, made and dropped
    for i in range(100):
        a = data + bytes([i])
        b = b"".join((a, a[:300000]))
        c = bytes(memoryview(b)[5:])
        del a, b, c
before = faults()
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
work()
print(faults() - before)
"""


def _faults(mode: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=env, check=True).stdout
    return int(out)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux only")
def test_buffers_are_reused_not_faulted_in_again() -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    try:
        tuned = _faults("tuned", env)
    except subprocess.CalledProcessError:
        pytest.skip("not glibc: mallopt is not there")
    default = _faults("default", env)
    # 300 rounds of ~3.3 MiB of buffers, each freed before the next: mostly fresh pages by
    # default (~800 page faults a round), the same heap memory once tuned
    assert default > 300 * 200
    assert tuned < 300 * 50


@pytest.mark.parametrize("name,value", [("MALLOC_ARENA_MAX", "2"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_an_operators_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch, name: str,
                                              value: str) -> None:
    from drctl.memory import tune_malloc

    monkeypatch.setenv(name, value)
    assert tune_malloc() is False
