#!/usr/bin/env bash
# The compose deployment (docker-compose.yml) with podman, on a Debian 12 host, as root; for
# hosts with no Docker engine, no image registry and no bridge networking (docs/deployment.md,
# "Quick start").
#
#   compose/run-podman.sh up                  # base image (once), wheels, images, services
#   compose/run-podman.sh status              # drctl status, from the controller's container
#   compose/run-podman.sh drctl failover app --config /etc/drctl/runbook.yaml
#   compose/run-podman.sh ps | logs SERVICE | exec SERVICE CMD...
#   compose/run-podman.sh down [--volumes]    # remove the containers (and the state)
#
# `up` installs podman, runc and debootstrap from apt when they are missing, builds the base
# image localhost/debian:bookworm with debootstrap from this machine's apt mirror (skipped when
# it exists; DRCTL_BASE_IMAGE=debian:bookworm uses a registry's instead) and puts the Python
# dependencies in compose/.wheels from the host's own package index, so the image build needs
# no index. Grafana (a registry image) is skipped unless its image is present locally.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/podman/containers.conf}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
COMPOSE=("$PY" "$HERE/podman/compose.py")
GRAFANA=grafana/grafana:11.2.0

cmd="${1:-up}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
  up)
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
        || ! command -v debootstrap >/dev/null; then
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman runc debootstrap >/dev/null
    fi
    export DRCTL_BASE_IMAGE="${DRCTL_BASE_IMAGE:-localhost/debian:bookworm}"
    start=$(date +%s)
    if [ "$DRCTL_BASE_IMAGE" = localhost/debian:bookworm ]; then
      "$HERE/make-base-image.sh" "$DRCTL_BASE_IMAGE" >/dev/null
      echo "run-podman: base image $DRCTL_BASE_IMAGE ready after $(( $(date +%s) - start ))s"
    fi
    "$PY" -m pip wheel -q --wheel-dir "$HERE/.wheels" "$ROOT" 'setuptools>=77'
    export DRCTL_WHEELS_ONLY=1
    skip=()
    podman image exists "$GRAFANA" || skip=(--skip grafana)
    "${COMPOSE[@]}" up "${skip[@]}" "$@"
    echo "run-podman: up after $(( $(date +%s) - start ))s"
    ;;
  status)
    exec "${COMPOSE[@]}" exec controller drctl status --config /etc/drctl/runbook.yaml "$@"
    ;;
  drctl)
    exec "${COMPOSE[@]}" exec controller drctl "$@"
    ;;
  *)
    exec "${COMPOSE[@]}" "$cmd" "$@"
    ;;
esac
