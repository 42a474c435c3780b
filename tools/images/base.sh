#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, pip and tini from Debian's own packages, made with debootstrap and
# committed with buildah: what `make images` builds on when no registry is reachable (CI, this repository's build
# machines). The Dockerfiles default to the public bases users pull (python:3.11-slim-bookworm, pytorch/pytorch);
# `make images` passes this one as their base build ARG instead.
#
#   tools/images/base.sh [IMAGE]      (default localhost/nnunet-distill-base:bookworm; needs root)
set -euo pipefail
image=${1:-localhost/nnunet-distill-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

if buildah inspect --type image "$image" > /dev/null 2>&1; then
  echo "base image $image exists (remove it with: buildah rmi $image)"
  exit 0
fi
root=$(mktemp -d /var/tmp/nnunet-distill-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,python-is-python3,tini,ca-certificates \
  bookworm "$root" "$mirror"
# Trust the CAs this build host trusts beyond Debian's own (a TLS-intercepting proxy on CI and build machines), so
# pip inside the builds reaches PyPI as the host does. Only this local base gets them, never a public image.
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root"/usr/local/share/ca-certificates/
  chroot "$root" update-ca-certificates > /dev/null
fi
# Debian marks its Python as externally managed (PEP 668); inside an image pip owns the environment.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
cp -a "$root"/. "$mnt"/
buildah umount "$ctr"
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --cmd /bin/bash --label org.opencontainers.image.description="Debian bookworm + python3 (debootstrap)" "$ctr"
buildah commit --rm "$ctr" "$image"
