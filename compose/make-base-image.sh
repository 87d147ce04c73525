#!/usr/bin/env bash
# Build the local Debian 12 base image the compose images start from when no image registry can
# be reached: debootstrap from this machine's own apt mirror, then `podman import`. Skipped when
# the image exists already. Prints the image name.
#   usage: compose/make-base-image.sh [NAME]     (default localhost/debian:bookworm; needs root)
set -euo pipefail
NAME="${1:-localhost/debian:bookworm}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/podman/containers.conf}"
if podman image exists "$NAME" 2>/dev/null; then echo "$NAME"; exit 0; fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "make-base-image: $tool is not installed" >&2; exit 69; }
done
# the mirror this machine's apt uses (deb822 .sources or a classic sources.list)
MIRROR=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -1)
[ -n "$MIRROR" ] || MIRROR=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
[ -n "$MIRROR" ] || { echo "make-base-image: no apt mirror found in /etc/apt" >&2; exit 69; }
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >/dev/null
tar -C "$ROOT" -c . | podman import - "$NAME" >/dev/null
echo "$NAME"
