#!/usr/bin/env bash
# Install everything drctl needs on a fresh Debian 12 machine (root): the real servers the
# tests and the demo start (etcd, named, prometheus), the tools the benchmarks compare against
# (rsync), what the fault and browser tests drive (iptables, Debian's chromium and its driver),
# and a Python venv with the package in editable mode plus dev tools.
#   usage: scripts/install-deps.sh [VENV_DIR]      (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
need=()
for bin in etcd named prometheus promtool rsync dig iptables chromium chromedriver named-checkzone tsig-keygen qemu-io nbdcopy nbdinfo fio nbdkit; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "install-deps: missing ${need[*]}: installing Debian packages"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends \
    etcd-server etcd-client bind9 bind9-utils bind9-dnsutils prometheus rsync iproute2 procps \
    iptables chromium chromium-driver qemu-utils libnbd-bin fio nbdkit >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/pip" install -q -e '.[dev]'
# Byte-compile the project once: where PYTHONDONTWRITEBYTECODE is set (as on the development
# machines) every drctl process would otherwise compile its modules again at start-up.
"$VENV/bin/python" -m compileall -q drctl replicator failover runbooks >/dev/null
# make's up-to-date mark (Makefile: DEPS), written last: a run that fails leaves none
touch "$VENV/.deps-stamp"
echo "install-deps: done ($("$VENV/bin/python" --version))"
