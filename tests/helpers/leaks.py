"""What a real-component test leaves behind, found by tracking what was really started.

A snapshot lists, for the user running the tests: processes (with starters and ``squashfuse``/``squashfuse_ll``
named as such), FUSE mounts, Apptainer instances (``apptainer instance list`` as this user, for each home
a test may use), Podman and Docker containers, Slurm jobs, and Apptainer build temporaries. A test's
leftovers are what its end snapshot holds that its start snapshot did not. ``tests/real/test_leak_checks.py``
proves that each kind of check fails on a deliberately leaked thing.

Processes are compared by (pid, start time), so a reused pid is never mistaken for an old process.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Long-lived helpers that are infrastructure, not something a test started: rootless Podman's pause
#: process (one per user, kept on purpose by Podman) and its user-namespace keeper.
INFRASTRUCTURE = ("catatonit -P", "podman system service")


@dataclass(frozen=True, order=True)
class Thing:
    """One tracked thing: its kind (process, squashfuse, starter, mount, instance, container, job, tmp)
    and an identity that is unique while it exists."""

    kind: str
    ident: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.ident}" + (f" ({self.detail})" if self.detail else "")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def processes(uid: int | None = None) -> set[Thing]:
    """This user's processes except this one and its ancestors; starters and squashfuse by name."""
    uid = os.getuid() if uid is None else uid
    skip = _ancestors(os.getpid())
    found: set[Thing] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        status = _read(f"/proc/{entry}/status")
        line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
        if not line or int(line.split()[1]) != uid:
            continue
        stat = _read(f"/proc/{entry}/stat")
        cmd = _read(f"/proc/{entry}/cmdline").replace("\0", " ").strip()
        if not stat or not cmd or any(cmd.startswith(i) or f"/{i}" in cmd for i in INFRASTRUCTURE):
            continue  # a kernel thread, a zombie (reaped soon), or infrastructure
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "Z":
            continue
        start = stat.rsplit(")", 1)[1].split()[19]
        kind = "process"
        if "squashfuse" in cmd:
            kind = "squashfuse"
        elif cmd.startswith(("Apptainer runtime parent", "Singularity runtime parent")) or "/starter" in cmd:
            kind = "starter"
        found.add(Thing(kind, f"{entry}@{start}", cmd[:200]))
    return found


def fuse_mounts() -> set[Thing]:
    """FUSE mounts visible to this process (squashfuse of a SIF, fuse-overlayfs...)."""
    found: set[Thing] = set()
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split(" ", 1)[0] if right else ""
        if fstype.startswith("fuse"):
            fields = left.split()
            found.add(Thing("mount", fields[4], fstype))
    return found


def _run(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(env) if env else None)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""


def instances(homes: Iterable[str]) -> set[Thing]:
    """Apptainer instances of this user, listed as this user with each home (Apptainer keeps them per home)."""
    binary = shutil.which("apptainer") or shutil.which("singularity")
    if not binary:
        return set()
    found: set[Thing] = set()
    for home in sorted(set(homes)):
        out = _run([binary, "instance", "list", "--json"], {**os.environ, "HOME": home})
        try:
            rows = json.loads(out or "{}").get("instances") or []
        except ValueError:
            rows = []
        for row in rows:
            found.add(Thing("instance", f"{row.get('instance')}@{home}", str(row.get("img", ""))))
    return found


def containers(environ: Mapping[str, str]) -> set[Thing]:
    """Containers of rootless Podman and of the Docker Engine (all of them: the test bed is ours)."""
    found: set[Thing] = set()
    if shutil.which("podman"):
        for line in _run(["podman", "ps", "-a", "--format", "{{.ID}} {{.Names}}"], environ).split("\n"):
            if line.strip():
                cid, _, name = line.partition(" ")
                found.add(Thing("container", f"podman:{cid}", name))
    docker = shutil.which("docker")
    if docker and os.path.exists("/run/docker.sock"):
        env = {**environ, "DOCKER_HOST": environ.get("DOCKER_HOST", "unix:///run/docker.sock")}
        for line in _run([docker, "ps", "-a", "--format", "{{.ID}} {{.Names}}"], env).split("\n"):
            if line.strip():
                cid, _, name = line.partition(" ")
                found.add(Thing("container", f"docker:{cid}", name))
    return found


def jobs(user: str) -> set[Thing]:
    """This user's Slurm jobs that are not finished."""
    if not shutil.which("squeue"):
        return set()
    out = _run(["squeue", "-h", "-u", user, "-o", "%i %T %j"])
    found: set[Thing] = set()
    for line in out.splitlines():
        parts = line.split(None, 2)
        if parts:
            found.add(Thing("job", parts[0], " ".join(parts[1:])))
    return found


def build_temps(uid: int | None = None) -> set[Thing]:
    """Apptainer's build temporaries in /tmp owned by this user (``build-temp-*``, ``bundle-temp-*``), and the
    private temporary directories of our builds (``hpck-build-*``, where Apptainer's go since builds have one)."""
    uid = os.getuid() if uid is None else uid
    found: set[Thing] = set()
    for path in glob.glob("/tmp/build-temp-*") + glob.glob("/tmp/bundle-temp-*") + glob.glob("/tmp/hpck-build-*"):
        try:
            if os.lstat(path).st_uid == uid:
                found.add(Thing("tmp", path))
        except OSError:
            continue
    return found


def snapshot(homes: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> set[Thing]:
    """Everything tracked, now."""
    env = dict(os.environ if environ is None else environ)
    user = env.get("USER") or str(os.getuid())
    return (processes() | fuse_mounts() | instances([*homes, env.get("HOME", "")]) | containers(env)
            | jobs(user) | build_temps())


def leftovers(before: set[Thing], homes: Iterable[str] = (), settle: float = 20.0,
              environ: Mapping[str, str] | None = None) -> set[Thing]:
    """What exists now and did not before, after giving asynchronous clean-up up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while True:
        new = snapshot(homes, environ) - before
        if not new or time.monotonic() >= deadline:
            return new
        time.sleep(0.5)


def remove(things: Iterable[Thing], homes: Iterable[str] = (), environ: Mapping[str, str] | None = None,
           mine: bool = False) -> None:
    """Best-effort removal of leftovers, so one test's leak does not fail the next.

    As root, processes are killed only when the caller knows they are its own (``mine``).
    """
    env = dict(os.environ if environ is None else environ)
    for thing in sorted(things):
        if thing.kind in ("process", "squashfuse", "starter") and os.getuid() == 0 and not mine:
            continue  # as root "a new process of this user" may be anyone's: report, never kill
        if thing.kind in ("process", "squashfuse", "starter"):
            pid = int(thing.ident.split("@")[0])
            if any(t.ident == thing.ident for t in processes()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        elif thing.kind == "mount":
            _run(["fusermount3", "-u", "-z", thing.ident]) or _run(["fusermount", "-u", "-z", thing.ident])
        elif thing.kind == "instance":
            name, _, home = thing.ident.partition("@")
            binary = shutil.which("apptainer") or "apptainer"
            _run([binary, "instance", "stop", "--force", name], {**env, "HOME": home})
        elif thing.kind == "container":
            runtime, _, cid = thing.ident.partition(":")
            cenv = {**env, "DOCKER_HOST": "unix:///run/docker.sock"} if runtime == "docker" else env
            _run([runtime, "rm", "-f", cid], cenv)  # (docker rm has no -t; -f kills at once anyway)
        elif thing.kind == "job":
            _run(["scancel", thing.ident])
        elif thing.kind == "tmp":
            shutil.rmtree(thing.ident, ignore_errors=True)
