#!/usr/bin/env bash
# Make a local Debian base image for the CPU image where no image registry can be reached:
# debootstrap a minimal root file system with Python, venv, CA certificates and tini, give it this
# host's CA bundle (so that pip and apt inside a build trust the same authorities as the host),
# and `docker import` it.
#
# Usage: deploy/make-base-image.sh [IMAGE]        (default: fitserve-base:bookworm)
# Needs: root, debootstrap (apt-get install -y debootstrap), a running Docker engine.
# Settings: DEBIAN_SUITE (bookworm: Python 3.11, the version the CPU torch wheel is built for),
#           DEBIAN_MIRROR, CA_BUNDLE (the host bundle copied in; empty to keep Debian's own).
set -euo pipefail

image=${1:-fitserve-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca_bundle=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
packages=python3,python3-venv,ca-certificates,tini

if ! command -v debootstrap >/dev/null; then
    echo "make-base-image: debootstrap is missing (apt-get install -y debootstrap)" >&2
    exit 1
fi
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/fitserve-rootfs.XXXXXX")
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT

echo "make-base-image: debootstrap $suite ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -20 "$rootfs.log" >&2
    exit 1
}
if [[ -n "$ca_bundle" && -f "$ca_bundle" ]]; then
    cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
# What an image needs at run time only: no package archives or lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

# An imported image has no configuration: give it the PATH and command that Debian's own image has.
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "make-base-image: $image ($(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec))"
