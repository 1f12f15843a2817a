#!/usr/bin/env bash
# Builds deploy/Dockerfile into the local image IMAGE (default modelstate:dev) with buildah,
# which needs no container engine (--isolation chroot). When the base image debian:bookworm is
# not in local storage (no registry is reachable here), it is made from Debian's archive with
# debootstrap and imported under that name, so the Dockerfile itself stays standard.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-modelstate:dev}"
export DEBIAN_FRONTEND=noninteractive
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update
  apt-get install -y --no-install-recommends buildah debootstrap
fi
base="docker.io/library/debian:bookworm"
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  # The archive this machine's apt already uses.
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  [ -n "$mirror" ] || mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$rootfs.tar" .
  container="$(buildah from scratch)"
  buildah add "$container" "$rootfs.tar" /
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$container"
  buildah commit --rm "$container" "$base"
  rm -f "$rootfs.tar"
fi
buildah bud --isolation chroot --layers -f deploy/Dockerfile -t "$IMAGE" .
buildah images "$IMAGE"
