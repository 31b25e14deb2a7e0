#!/usr/bin/env bash
# A Debian bookworm base image made here, for machines that reach a Debian mirror and a
# Python package index but no container registry (so `FROM python:3.11-slim-bookworm`
# cannot be pulled). It holds what Dockerfile.cpu expects of its base: `python`
# (Debian's Python 3.11), venv, pip's certificates.
#
#   docker/make-base-image.sh                       # -> localhost/disttrain-base:bookworm
#   podman build -f docker/Dockerfile.cpu --build-arg PYTHON_IMAGE=localhost/disttrain-base:bookworm ...
#
# Variables: IMAGE (the name above), ROOT (the root file system to build; default a temp dir,
# removed afterwards unless KEEP_ROOT=1), MIRROR (Debian mirror URL; default: the first
# `URIs:`/`deb` line of this host's apt sources, else debootstrap's own default),
# HOST_APT (1: copy this host's apt sources and apt.conf.d into the image, so apt inside
# uses the same mirror and settings), ENGINE (podman, or docker). Needs root, debootstrap.
set -euo pipefail

IMAGE="${IMAGE:-localhost/disttrain-base:bookworm}"
ENGINE="${ENGINE:-podman}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

host_mirror() {
    # deb822 sources (`URIs: ...`) first, then one-line sources (`deb [opts] URI suite ...`).
    local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    awk '/^URIs:/ {print $2; exit}' "${files[@]}" 2>/dev/null | head -n1 | grep . && return
    awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' "${files[@]}" 2>/dev/null | head -n1
}

MIRROR="${MIRROR-$(host_mirror || true)}"
if [ -z "${ROOT:-}" ]; then
    ROOT="$(mktemp -d /var/tmp/disttrain-rootfs.XXXXXX)"
    [ "${KEEP_ROOT:-0}" = 1 ] || trap 'rm -rf "$ROOT"' EXIT
fi

echo "debootstrap $SUITE into $ROOT (mirror: ${MIRROR:-debootstrap default})"
# shellcheck disable=SC2086  # MIRROR is empty or one word
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" ${MIRROR}

if [ "${HOST_APT:-1}" = 1 ]; then
    rm -f "$ROOT/etc/apt/sources.list"
    cp -a /etc/apt/sources.list.d/. "$ROOT/etc/apt/sources.list.d/" 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp -a /etc/apt/sources.list "$ROOT/etc/apt/"
    # settings only (a mirror's Check-Valid-Until...): hooks that call host tools stay out
    for conf in /etc/apt/apt.conf.d/*; do
        grep -q Invoke "$conf" || [ -e "$ROOT/etc/apt/apt.conf.d/${conf##*/}" ] || cp -a "$conf" "$ROOT/etc/apt/apt.conf.d/"
    done
    find "$ROOT/etc/apt/sources.list.d" -type f ! -name '*.sources' ! -name '*.list' -delete
fi
# an image is not a booted system: no apt caches or logs baked in
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log

tar -C "$ROOT" -c . | "$ENGINE" import \
    --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$IMAGE"
echo "made $IMAGE"
