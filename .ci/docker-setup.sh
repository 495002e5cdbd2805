#!/usr/bin/env bash
# A real Docker Engine for the `runtime: docker` tests, from Debian's own docker.io package, as root.
# Idempotent. No downloads from anywhere but Debian's mirror.
#   - dockerd with NO default bridge (--bridge=none) and no iptables rules: our kernels use the host
#     network, and no container traffic may go anywhere but loopback;
#   - the socket /run/docker.sock, group `docker`; the test user ($HPCK_USER) is put in that group
#     (on a laptop that is how users reach Docker; it is root-equivalent, fine on a throw-away test bed);
#   - imports $HPCK_CI_CACHE/rootfs.tar as localhost/hpck-test:bookworm.
# The docker CLI is /usr/bin/docker from docker.io: .ci/run puts /usr/bin before /usr/local/bin for the
# tests, so a client that came with the machine image is never what they drive.
set -euo pipefail
CACHE=${HPCK_CI_CACHE:-/var/cache/hpc-kernels-ci}
U1=${HPCK_USER:-hpck-a}
IMAGE=localhost/hpck-test:bookworm
DOCKER=/usr/bin/docker
export DEBIAN_FRONTEND=noninteractive
log() { printf '[docker-setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if ! dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q 'ok installed'; then
  log "apt-get install docker.io"
  apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends docker.io >/dev/null
fi
getent group docker >/dev/null || groupadd --system docker
id -nG "$U1" | tr ' ' '\n' | grep -qx docker || usermod -aG docker "$U1"

up() { "$DOCKER" -H unix:///run/docker.sock version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! up; then
  log "starting dockerd (--bridge=none --iptables=false)"
  mkdir -p /etc/docker
  # cwd /: a daemon must not hold the directory it was started from (a CI clone deleted later).
  (cd / && exec setsid dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false \
      --ip-masq=false --userland-proxy=false -H unix:///run/docker.sock --group docker \
      --pidfile /run/hpck-dockerd.pid >"$CACHE/dockerd.log" 2>&1 </dev/null) &
  for _ in $(seq 150); do up && break; sleep 0.2; done
  up || { tail -30 "$CACHE/dockerd.log" >&2; exit 1; }
fi
log "dockerd $("$DOCKER" version --format '{{.Server.Version}}') ($("$DOCKER" info --format '{{.Driver}} {{.CgroupVersion}}'))"
if ! "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  [[ -s $CACHE/rootfs.tar ]] || { echo "$CACHE/rootfs.tar missing: run .ci/build-test-image.sh first" >&2; exit 1; }
  log "docker import $IMAGE"
  "$DOCKER" import "$CACHE/rootfs.tar" "$IMAGE" >/dev/null
fi
"$DOCKER" run --rm --network=host "$IMAGE" test -f /etc/hpck-test-image
log "docker run ok"
