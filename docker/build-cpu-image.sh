#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman where no container registry is reachable: on a
# Debian base image made here (docker/make-base-image.sh, once), with this host's pip
# settings (CA bundle, local wheel folder such as a CPU torch wheel) mounted read-only, and
# docker/containers.conf for hosts whose root cannot raise rlimits.
#
#   docker/build-cpu-image.sh                 # -> localhost/disttrain:cpu
#   CONTAINERS_CONF=docker/containers.conf podman run --rm localhost/disttrain:cpu
#
# Variables: TAG (localhost/disttrain:cpu), BASE (localhost/disttrain-base:bookworm; made
# if absent), EXTRAS (the Dockerfile's), PIP_CERT / PIP_FIND_LINKS (default: pip's own
# settings on this host), CONTAINERS_CONF (default docker/containers.conf).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-localhost/disttrain:cpu}"
BASE="${BASE:-localhost/disttrain-base:bookworm}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/containers.conf}"
PIP="${PIP:-$(command -v pip || command -v pip3 || true)}"
pip_setting() {  # the first value pip itself would use: its environment or a config file
    [ -n "$PIP" ] || return 0
    "$PIP" config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\([^ ']*\).*/\1/p" | head -n1
}

podman image exists "$BASE" || IMAGE="$BASE" docker/make-base-image.sh

args=(--build-arg "PYTHON_IMAGE=$BASE" --ignorefile docker/Dockerfile.cpu.dockerignore
      --ulimit nofile=16384:16384 --ulimit nproc=16384:16384)
[ -n "${EXTRAS:-}" ] && args+=(--build-arg "EXTRAS=$EXTRAS")
cert="${PIP_CERT:-$(pip_setting cert)}"
if [ -f "$cert" ]; then
    args+=(-v "$cert:/run/host/ca.crt:ro" --build-arg PIP_CERT=/run/host/ca.crt)
fi
wheels="${PIP_FIND_LINKS:-$(pip_setting find-links)}"
if [ -d "$wheels" ]; then
    args+=(-v "$wheels:/run/host/wheels:ro" --build-arg PIP_FIND_LINKS=/run/host/wheels)
fi

set -x
podman build -f docker/Dockerfile.cpu "${args[@]}" -t "$TAG" .
