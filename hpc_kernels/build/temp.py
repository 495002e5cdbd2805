"""The temporary files of an image build, who owns them, and sweeping what a killed build left.

A build of ``IMAGE`` works in two places of its own:

* a *work directory* beside the image, ``.IMAGE.build-HOST-PID/``, holding the temporary image
  (``image.sif``, renamed over ``IMAGE`` when the build succeeds) and ``owner.json`` (host, pid, the
  process's start time and boot id, the paths below). Once it is removed, a build process that somehow
  outlived its owner cannot write its image there (Apptainer does not create the parent directory).
* a private ``APPTAINER_TMPDIR`` on node-local disk, ``hpck-build-UID-KERNEL-HOST-PID/`` under the user's
  ``$APPTAINER_TMPDIR``, else ``$SLURM_TMPDIR``, else the system's temporary directory (where Apptainer
  unpacks the root file system: hundreds of MB; an unprivileged build cannot work on NFS/Lustre).

An *index* entry in the per-host state directory (``hosts/HOST/builds/``) names both, so ``gc`` finds
them without a registry. While a build runs, its guard (:mod:`hpc_kernels.build.guard`) touches
``owner.json`` every :data:`HEARTBEAT` seconds.

A build is *stale* (its files may go) when: on this host, its owner process is gone (pid and start time,
same boot); on another host sharing the file system, ``owner.json`` has not been touched for
:data:`STALE_AFTER` seconds (nothing can check a pid there). The next build of the image sweeps under the
image's lock; ``gc`` sweeps every index entry of this user.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import paths, proc, procfs
from hpc_kernels.errors import HpcKernelsError, LockBusyError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.leftovers import Leftover
from hpc_kernels.locks import cluster_lock, dead_local_holder, flock_held

OWNER = "owner.json"
TEMP_IMAGE = "image.sif"
WORK_INFIX = ".build-"
TMP_PREFIX = "hpck-build-"
#: The variable that tells our ``singularity`` shim's guard which build it runs (the path of owner.json).
ENV_RECORD = "HPC_KERNELS_BUILD_RECORD"
#: Seconds between two touches of owner.json by a running build's guard.
HEARTBEAT = 60.0
#: A build on another host whose owner.json is older than this is taken for dead (generous: clocks of
#: cluster nodes and NFS attribute caches disagree by seconds to minutes).
STALE_AFTER = 15 * 60.0
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Owner:
    """The process that runs a build, pinned so that a reused pid or a reboot never passes for it."""

    host: str
    pid: int
    start: int
    boot: str

    @classmethod
    def me(cls) -> Owner:
        """This process."""
        ref = procfs.proc_ref(os.getpid())
        return cls(paths.hostname(), os.getpid(), ref.start if ref else 0, procfs.boot_id())

    def local(self) -> bool:
        """True when the owner ran on this host."""
        return self.host == paths.hostname()

    def alive(self) -> bool:
        """On this host: the very same process still runs. (Callers judge other hosts by heartbeat.)"""
        return self.local() and self.boot == procfs.boot_id() and procfs.ProcRef(self.pid, self.start).alive()


@dataclass(frozen=True)
class BuildTemp:
    """The temporary places of one build (see the module docstring)."""

    kernel: str
    image: Path
    workdir: Path
    tmpdir: Path
    index: Path
    owner: Owner
    started_at: float

    @property
    def temp_image(self) -> Path:
        """Where the runtime writes the new image."""
        return self.workdir / TEMP_IMAGE

    @property
    def record(self) -> Path:
        """``owner.json`` in the work directory."""
        return self.workdir / OWNER

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (owner.json and the index entry hold the same)."""
        return {"kernel": self.kernel, "image": str(self.image), "workdir": str(self.workdir),
                "tmpdir": str(self.tmpdir), "index": str(self.index), "host": self.owner.host,
                "pid": self.owner.pid, "start": self.owner.start, "boot": self.owner.boot,
                "started_at": self.started_at, "generator": "hpc-kernels"}

    @classmethod
    def from_json(cls, data: Any) -> BuildTemp:
        """Inverse of :meth:`to_json`; ``ValueError`` on anything we would not have written (so that a
        crafted record can never make us remove a directory that is not a build's)."""
        try:
            temp = cls(str(data["kernel"]), Path(data["image"]), Path(data["workdir"]), Path(data["tmpdir"]),
                       Path(data["index"]), Owner(str(data["host"]), int(data["pid"]), int(data["start"]),
                                                  str(data["boot"])), float(data["started_at"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a build record: {exc}") from None
        work_prefix = f".{temp.image.name}{WORK_INFIX}"
        if (data.get("generator") != "hpc-kernels" or temp.workdir.parent != temp.image.parent
                or not temp.workdir.name.startswith(work_prefix) or not temp.tmpdir.name.startswith(TMP_PREFIX)
                or not temp.workdir.is_absolute() or not temp.tmpdir.is_absolute()):
            raise ValueError("not a build record of hpc-kernels")
        return temp


def load(path: Path) -> BuildTemp:
    """The build record at ``path`` (owner.json or an index entry); OSError/ValueError when unreadable."""
    return BuildTemp.from_json(json.loads(path.read_text(encoding="utf-8")))


def tmp_base(environ: dict[str, str] | None = None) -> Path:
    """Where private Apptainer temporary directories go: the user's ``$APPTAINER_TMPDIR`` (or
    ``$SINGULARITY_TMPDIR``), else ``$SLURM_TMPDIR`` (node-local, removed with the job), else
    ``$TMPDIR``/``/tmp``."""
    env = os.environ if environ is None else environ
    for var in ("APPTAINER_TMPDIR", "SINGULARITY_TMPDIR", "SLURM_TMPDIR"):
        if env.get(var):
            return Path(env[var])
    return Path(tempfile.gettempdir())


def index_dir(host: str | None = None) -> Path:
    """The index of this user's builds on ``host`` (default: this one)."""
    return paths.state_dir() / "hosts" / (host or paths.hostname()) / "builds"


def create(kernel: str, image: Path) -> BuildTemp:
    """Make the places of a new build of ``image`` by this process: index entry first (so ``gc`` can
    find whatever follows), then the work directory with owner.json, then the private tmpdir."""

    owner = Owner.me()
    tag = _SAFE.sub("_", f"{owner.host}-{owner.pid}")
    temp = BuildTemp(
        kernel=kernel, image=image, workdir=image.parent / f".{image.name}{WORK_INFIX}{tag}",
        # The uid too: /tmp is shared, and another user's killed build may have had our pid.
        tmpdir=tmp_base() / f"{TMP_PREFIX}{os.getuid()}-{_SAFE.sub('_', kernel)}-{tag}",
        index=index_dir() / f"{_SAFE.sub('_', kernel)}.{owner.pid}.json", owner=owner, started_at=time.time())
    text = json.dumps(temp.to_json(), indent=1) + "\n"
    atomic_write(temp.index, text)
    try:
        for leftover in (temp.workdir, temp.tmpdir):  # a build of ours with this pid that was killed
            remove_tree(leftover)
        temp.workdir.mkdir(parents=True)
        atomic_write(temp.record, text)
        temp.tmpdir.mkdir(mode=0o700, parents=True)
    except OSError:
        remove(temp)  # nothing half-made stays (the index too, once the rest is gone)
        raise
    return temp


def remove(temp: BuildTemp) -> list[str]:
    """Remove a build's places; the index entry goes last, and only when the rest is gone (so a removal
    that fails is retried by ``gc``). Returns what could not be removed, with the reason."""
    problems: list[str] = []
    places = [temp.workdir] + ([temp.tmpdir] if temp.owner.local() else [])
    for place in places:
        try:
            remove_tree(place)
        except OSError as exc:
            problems.append(f"{place}: {exc.strerror or exc}")
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            temp.index.unlink()
    return problems


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree a build made; ``OSError`` when some of it stays.

    An unprivileged build runs in a user namespace where files of other container users (apt's
    ``_apt``...) belong to the user's *sub*-uids: outside the namespace the user cannot remove them from a
    directory they cannot write. ``unshare --map-root-user --map-auto`` (util-linux >= 2.38) enters such
    a namespace to remove them, as Apptainer itself would.
    """
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    try:
        shutil.rmtree(path)
        return
    except OSError as exc:
        error = exc
    unshare = shutil.which("unshare")
    if unshare:
        with contextlib.suppress(HpcKernelsError):
            proc.run([unshare, "--map-root-user", "--map-auto", "rm", "-rf", "--", str(path)], check=False,
                     timeout=600)
    if os.path.lexists(path):
        raise error


def heartbeat_age(temp: BuildTemp, now: float | None = None) -> float:
    """Seconds since the build's guard last touched owner.json (since the work directory changed, when
    owner.json is gone; infinite when both are)."""
    for place in (temp.record, temp.workdir):
        with contextlib.suppress(OSError):
            return (time.time() if now is None else now) - place.stat().st_mtime
    return float("inf")


def stale_reason(temp: BuildTemp, now: float | None = None) -> str | None:
    """Why the build's files may be removed, or None while its build may still run."""
    owner = temp.owner
    if owner.local():
        if owner.alive():
            return None
        return f"left by a killed build of '{temp.kernel}' (pid {owner.pid} on {owner.host} is gone)"
    age = heartbeat_age(temp, now)
    if age < STALE_AFTER:
        return None
    return (f"left by a build of '{temp.kernel}' on {owner.host} (pid {owner.pid}) that has shown no sign of "
            f"life for {age / 60:.0f} min")


def image_lock(image: Path) -> Path:
    """The lock that serialises builds of ``image`` on every node and for every user of a group (build.py
    holds it as a :func:`~hpc_kernels.locks.cluster_lock`)."""
    return image.parent / f".{image.name}.build-lock"


def sweep_image(image: Path) -> list[str]:
    """Remove what killed builds of ``image`` left beside it; called by a build under the image's lock.

    Work directories of builds that may still run (another host, recent heartbeat) are left alone.
    Returns a line per leftover removed or left alone, for the build log.
    """
    notes: list[str] = []
    # Temporary images of hpc-kernels before work directories: their build held this lock, which we hold.
    for legacy in image.parent.glob(f".{glob_escape(image.name)}.tmp-*"):
        with contextlib.suppress(OSError):
            remove_tree(legacy)
            notes.append(f"removed {legacy} (left by a killed build)")
    for workdir in sorted(image.parent.glob(f".{glob_escape(image.name)}{WORK_INFIX}*")):
        try:
            temp = load(workdir / OWNER)
        except (OSError, ValueError):
            # No readable owner.json: killed between mkdir and its write (or not ours to judge, when young).
            if _age(workdir) > STALE_AFTER:
                with contextlib.suppress(OSError):
                    remove_tree(workdir)
                    notes.append(f"removed {workdir} (no owner record)")
            continue
        if temp.workdir != workdir:
            continue
        reason = stale_reason(temp)
        if reason is None:
            notes.append(f"left {workdir} alone: its build may still run ({temp.owner.host}, pid {temp.owner.pid})")
            continue
        problems = remove(temp)
        notes.append(f"removed {workdir} ({reason})" if not problems else
                     f"could not remove all of {workdir}: {'; '.join(problems)}")
    return notes


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return glob.escape(name)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def records() -> Iterator[tuple[Path, BuildTemp | None]]:
    """Every index entry of this user's builds, on every host (the state dir may be shared), parsed
    (None when unreadable)."""
    hosts = paths.state_dir() / "hosts"
    for entry in sorted(hosts.glob("*/builds/*.json")) if hosts.is_dir() else []:
        try:
            yield entry, load(entry)
        except (OSError, ValueError):
            yield entry, None


def sweep(dry_run: bool = False) -> list[Leftover]:
    """``gc``: remove the work directories and temporary directories of this user's killed builds."""
    found: list[Leftover] = []
    for entry, temp in records():
        if temp is None:
            if _age(entry) > STALE_AFTER:
                found.append(Leftover("builds", str(entry), "removed", "an unreadable build record"))
                if not dry_run:
                    with contextlib.suppress(OSError):
                        entry.unlink()
            continue
        reason = stale_reason(temp)
        if reason is None or (temp.owner.local() and guard_busy(temp)):  # its guard is cleaning up now
            continue
        if not temp.owner.local() and temp.image.parent.is_dir():  # (a lock would create a missing dir)
            # Another host: a build running there holds the image's lock (a cluster lock reaches across
            # hosts); a lock we can take now means no build of the image runs anywhere.
            try:
                with cluster_lock(image_lock(temp.image), wait=False):
                    pass
            except LockBusyError:
                continue
            except OSError:  # the image's directory is not ours to lock in: judge by the heartbeat alone
                pass
        places = [p for p in (temp.workdir, temp.tmpdir if temp.owner.local() else None)
                  if p is not None and os.path.lexists(p)]
        for place in places:
            found.append(Leftover("builds", str(place), "removed", reason))
        if not places:
            found.append(Leftover("builds", str(entry), "removed", f"record of a finished build ({reason})"))
        if not dry_run:
            for problem in remove(temp):
                found.append(Leftover("builds", problem.split(":", 1)[0], "left alone",
                                     f"could not be removed: {problem.split(': ', 1)[-1]}"))
        found += _sweep_lock(temp, dry_run)
    return found


def _sweep_lock(temp: BuildTemp, dry_run: bool) -> list[Leftover]:
    """The image's build lock, when the killed build of ``temp`` (or another dead process of this host)
    still holds it: taking the lock over and releasing it removes the file, as the next build would."""
    lock = image_lock(temp.image)
    holder = dead_local_holder(lock) if temp.image.parent.is_dir() else None
    if holder is None:
        return []
    found = [Leftover("builds", str(lock), "removed", f"a build lock left by pid {holder.pid} on {holder.host}, "
                      "which is gone")]
    if not dry_run:
        try:
            with cluster_lock(lock, wait=False):
                pass
        except (LockBusyError, OSError):  # taken by a new build meanwhile, or not ours to write: leave it
            return []
    return found


def cancel(temp: BuildTemp) -> None:
    """Tell the build's guard to stop the build: it watches owner.json, and kills the build when it goes."""
    with contextlib.suppress(FileNotFoundError):
        temp.record.unlink()


def guard_busy(temp: BuildTemp) -> bool:
    """True while the guard of ``temp`` runs: it holds ``guard.lock`` in the private tmpdir meanwhile (never
    created here: only the guard makes it)."""
    return flock_held(temp.tmpdir / GUARD_LOCK)


def wait_for_guard(temp: BuildTemp, timeout: float = 15.0) -> bool:
    """Wait until the guard of ``temp`` (if one ran) has finished; False when it is still busy after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while guard_busy(temp):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


GUARD_LOCK = "guard.lock"
