"""``hpc-kernels gc``'s sweeper for Docker/Podman: per-kernel containers whose launcher is gone, shared
containers idle past their timeout, and the bookkeeping of shared containers that are gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hpc_kernels import paths, procfs
from hpc_kernels.errors import RuntimeNotFoundError, ToolError
from hpc_kernels.leftovers import Leftover, in_use
from hpc_kernels.locks import locked
from hpc_kernels.runtimes.docker.cli import (
    LABEL_HOST,
    LABEL_IDLE,
    LABEL_OWNER,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_ROLE,
    ContainerCLI,
    ContainerInfo,
    user_name,
)
from hpc_kernels.runtimes.docker.container import LABEL_STATE_DIR, forget_shared, live_kernels, shared_dir, stop_if_idle

# ----------------------------------------------------------------------------- gc


def launcher_alive(info: ContainerInfo) -> bool:
    """Whether the launcher recorded on a per-kernel container still runs (same pid, same start time)."""
    try:
        pid = int(info.labels.get(LABEL_PID, "0"))
    except ValueError:
        return False
    if pid <= 0 or not procfs.alive(pid):
        return False
    recorded = info.labels.get(LABEL_PID_START, "")
    return not recorded or recorded == procfs.start_of(pid)


def sweep(dry_run: bool = False) -> list[Leftover]:
    """The ``hpc-kernels gc`` sweeper for Docker/Podman containers (see :func:`sweep_containers`); only
    the runtimes a kernel uses are asked (:func:`hpc_kernels.leftovers.in_use`)."""
    reason = "per-kernel container whose launcher is gone, or shared container idle past its timeout"
    action = "would remove" if dry_run else "removed"
    runtimes = [r for r in ("podman", "docker") if in_use(r)]
    if not runtimes:
        return []
    found = [Leftover("containers", name, action, reason)
             for name in sweep_containers(runtimes, dry_run=dry_run)]
    found += [Leftover("containers", str(sdir), "would remove" if dry_run else "removed",
                         "bookkeeping of a shared container that is gone")
              for sdir in sweep_shared_dirs(runtimes, dry_run=dry_run)]
    return found


def sweep_shared_dirs(runtimes: Sequence[str] = ("podman", "docker"), dry_run: bool = False) -> list[Path]:
    """Remove the bookkeeping (``containers/<name>/``) of shared containers that no installed runtime
    has any more (stopped by hand, by a reboot, by a watcher that was killed); the directories removed.
    Judges nothing when a runtime is installed but does not answer."""
    base = paths.host_state_dir() / "containers"
    dirs = sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    clis: list[ContainerCLI] = []
    for runtime in runtimes if dirs else ():
        try:
            clis.append(ContainerCLI(runtime))
        except RuntimeNotFoundError:
            continue

    def exists(name: str) -> bool:
        # ps fails (ToolError) when a daemon does not answer: then the container may well exist.
        return any(cli.ids(f"name=^{name}$") for cli in clis)

    removed = []
    for sdir in dirs:
        try:
            if exists(sdir.name):
                continue
            if dry_run:
                if not live_kernels(sdir, prune=False):
                    removed.append(sdir)
                continue
            with locked(sdir / "lock", blocking=False, private=True) as held:
                # Re-checked under its lock: a launch may have started it meanwhile (and holds the lock).
                if held and not live_kernels(sdir) and not exists(sdir.name):
                    forget_shared(sdir)
                    removed.append(sdir)
        except ToolError:
            return removed
    return removed


def sweep_containers(runtimes: Sequence[str] = ("podman", "docker"), dry_run: bool = False) -> list[str]:
    """Remove our leftover containers on this host: per-kernel ones whose launcher is gone, and shared
    ones with no live kernel that have been idle past their timeout. Returns the names removed.
    With ``dry_run`` only the per-kernel ones are reported (judging a shared one takes its lock)."""
    removed: list[str] = []
    seen: set[str] = set()
    for runtime in runtimes:
        try:
            cli = ContainerCLI(runtime)
            infos = cli.ours(f"label={LABEL_HOST}={paths.hostname()}", f"label={LABEL_OWNER}={user_name()}")
        except (RuntimeNotFoundError, ToolError):
            continue  # not installed, or no daemon to talk to
        for info in infos:
            if info.id in seen:  # docker pointed at podman's service sees the same containers
                continue
            seen.add(info.id)
            role = info.labels.get(LABEL_ROLE)
            if role == "kernel" and not launcher_alive(info):
                if not dry_run:
                    cli.remove(info.name)
                removed.append(info.name)
            elif role == "shared" and not dry_run:
                sdir = Path(info.labels.get(LABEL_STATE_DIR) or shared_dir(info.name))
                try:
                    idle = float(info.labels.get(LABEL_IDLE, "0"))
                except ValueError:
                    idle = 0.0
                if sdir.is_dir():
                    if stop_if_idle(cli, info.name, sdir, idle):
                        removed.append(info.name)
                else:
                    cli.remove(info.name)
                    removed.append(info.name)
    return removed
