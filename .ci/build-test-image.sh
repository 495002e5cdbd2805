#!/usr/bin/env bash
# Build the small test image the real-component tests use, from Debian's packages only
# (no container registry): debootstrap minbase bookworm + python3 + python3-ipykernel.
# Cached OUTSIDE the clone (default /var/cache/hpc-kernels-ci) so later CI runs reuse it.
#   $CACHE/rootfs.tar   the root filesystem (podman import uses it)
#   $CACHE/base.sif     the same rootfs as a SIF (apptainer tests use it)
# The file /etc/hpck-test-image inside the image lets tests prove code ran in the container.
set -euo pipefail
CACHE=${HPCK_CI_CACHE:-/var/cache/hpc-kernels-ci}
APPTAINER=${APPTAINER:-apptainer}
mkdir -p "$CACHE"
log() { printf '[test-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
MIRROR=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -1 || true)
[[ -n $MIRROR ]] || { echo "no Debian mirror found in the apt sources" >&2; exit 1; }

if [[ ! -s $CACHE/rootfs.tar ]]; then
  command -v debootstrap >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 install -y -q debootstrap >/dev/null; }
  R=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'umount -R "$R/proc" 2>/dev/null || true; rm -rf "$R"' EXIT
  log "debootstrap bookworm minbase from $MIRROR"
  debootstrap --variant=minbase bookworm "$R" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  log "installing python3-ipykernel in the chroot"
  # debootstrap's --include=python3-ipykernel leaves python3-zmq unconfigured; apt in the chroot works.
  mount -t proc proc "$R/proc"
  chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3 python3-ipykernel >"$CACHE/chroot-apt.log" 2>&1 || { tail -20 "$CACHE/chroot-apt.log" >&2; exit 1; }
  chroot "$R" apt-get clean
  umount "$R/proc"
  rm -rf "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/locale/*
  echo "hpc-kernels test image (debian bookworm)" > "$R/etc/hpck-test-image"
  chroot "$R" python3 -c 'import ipykernel, zmq'
  tar -C "$R" --numeric-owner -cpf "$CACHE/rootfs.tar.tmp" . && mv "$CACHE/rootfs.tar.tmp" "$CACHE/rootfs.tar"
  rm -rf "$R"; trap - EXIT
  log "rootfs.tar ready ($(du -h "$CACHE/rootfs.tar" | cut -f1))"
fi

if [[ ! -s $CACHE/base.sif ]]; then
  R=$(mktemp -d "$CACHE/sandbox.XXXXXX")
  trap 'rm -rf "$R"' EXIT
  tar -C "$R" -xpf "$CACHE/rootfs.tar"
  log "apptainer build base.sif"
  APPTAINER_BIND= "$APPTAINER" build --force "$CACHE/base.sif.tmp" "$R/" >"$CACHE/sif-build.log" 2>&1 \
    || { tail -20 "$CACHE/sif-build.log" >&2; exit 1; }
  mv "$CACHE/base.sif.tmp" "$CACHE/base.sif"
  rm -rf "$R"; trap - EXIT
  log "base.sif ready ($(du -h "$CACHE/base.sif" | cut -f1))"
fi
