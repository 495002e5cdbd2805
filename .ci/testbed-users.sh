#!/usr/bin/env bash
# The people of the small-DRAC test bed, as root. Idempotent.
#   hpck-a, hpck-b   two unprivileged users (homes 0700, as on DRAC), both in the group hpck-grp
#   /project/def-hpck  the group's shared tree: root:hpck-grp, setgid 2770 (DRAC's /project/def-<pi>)
#   subordinate ids   for Apptainer's user namespaces (--fakeroot) and rootless Podman
#   /dev/fuse 0666    what every distribution's udev rules do: unprivileged Apptainer mounts SIFs
#                     with squashfuse_ll through it
#   /run/user/<uid>   the per-user runtime dir logind would make (rootless Podman keeps its state there)
#   sudo              hpck-a may act as hpck-b (only): the two-user tests run as hpck-a and switch
# Names and ids can be overridden: HPCK_USER, HPCK_USER2, HPCK_GROUP, HPCK_PROJECT.
set -euo pipefail
[[ $(id -u) -eq 0 ]] || { echo "testbed-users.sh must run as root" >&2; exit 1; }
U1=${HPCK_USER:-hpck-a}; U2=${HPCK_USER2:-hpck-b}; G=${HPCK_GROUP:-hpck-grp}
PROJECT=${HPCK_PROJECT:-/project/def-hpck}
log() { printf '[testbed-users %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

command -v sudo >/dev/null && command -v newuidmap >/dev/null || {
  apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends sudo uidmap >/dev/null; }

getent group "$G" >/dev/null || groupadd "$G"
base=200000
for u in "$U1" "$U2"; do
  if ! id "$u" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --groups "$G" "$u"
    log "created user $u"
  fi
  id -nG "$u" | tr ' ' '\n' | grep -qx "$G" || usermod -aG "$G" "$u"
  chmod 0700 "$(getent passwd "$u" | cut -d: -f6)"
  for f in /etc/subuid /etc/subgid; do
    grep -q "^$u:" "$f" 2>/dev/null || echo "$u:$base:65536" >>"$f"
  done
  base=$((base + 65536))
  uid=$(id -u "$u")
  install -d -o "$u" -g "$(id -gn "$u")" -m 0700 "/run/user/$uid"
done

# udev's rules on every distribution (50-udev-default.rules: KERNEL=="fuse", MODE="0666"; and
# KERNEL=="tun", MODE="0666", which rootless Podman's slirp4netns opens).
chmod 0666 /dev/fuse
[[ -e /dev/net/tun ]] || { mkdir -p /dev/net; mknod -m 0666 /dev/net/tun c 10 200; }
chmod 0666 /dev/net/tun

install -d -o root -g root -m 0755 "$(dirname "$PROJECT")"
chown root:root "$(dirname "$PROJECT")"; chmod 0755 "$(dirname "$PROJECT")"
install -d -o root -g "$G" -m 2770 "$PROJECT"

echo "$U1 ALL=($U2) NOPASSWD: ALL" >/etc/sudoers.d/hpck-testbed-$U1.tmp
chmod 0440 /etc/sudoers.d/hpck-testbed-$U1.tmp
visudo -cf /etc/sudoers.d/hpck-testbed-$U1.tmp >/dev/null
mv /etc/sudoers.d/hpck-testbed-$U1.tmp /etc/sudoers.d/hpck-testbed-$U1

max=$(cat /proc/sys/user/max_user_namespaces)
[[ $max -gt 0 ]] || { echo "user namespaces are disabled (user.max_user_namespaces=0)" >&2; exit 1; }
log "users $U1 $U2 in $G; $PROJECT $(stat -c '%A %U:%G' "$PROJECT"); /dev/fuse $(stat -c %a /dev/fuse)"
