"""``hpc-kernels instances`` and ``hpc-kernels stop``: what shared instances run here, and stopping one.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.runtimes.apptainer.instance import IDLE, NAME_RE, STOP_TIMEOUT, instance_dir, root
from hpc_kernels.runtimes.apptainer.records import (
    InstanceRecord,
    _kill,
    _lock,
    attachments,
    clear_leftovers,
    forget,
    read_record,
    reaper_running,
    record_problem,
)

# ----------------------------------------------------------------------------- stop, status


@dataclass(frozen=True)
class InstanceStatus:
    """One of our instances on this host, as ``hpc-kernels instances`` shows it."""

    name: str
    kernel: str
    image: str
    state: str  # running | dead
    pid: int
    kernels: int
    started_at: float
    idle_since: float | None
    idle_timeout: float
    reaper: bool

    def idle_for(self, now: float | None = None) -> float | None:
        """Seconds without any kernel attached (None while kernels are attached)."""
        if self.kernels or self.idle_since is None:
            return None
        return max(0.0, (now or time.time()) - self.idle_since)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for ``--json``."""
        data = asdict(self)
        data["idle_for"] = self.idle_for(now)
        return data


def status(d: Path) -> InstanceStatus | None:
    """The status of the instance recorded in ``d`` (read-only: prunes nothing)."""
    record = read_record(d)
    if record is None:
        return None
    found = attachments(d)
    live = [a for a in found if a.alive()]
    idle_since: float | None = None
    if not live:
        try:
            data = (d / IDLE).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            data = ""
        try:
            idle_since = float(data)
        except ValueError:
            # The reaper has not looked yet: a kernel that just ended, or none ever attached.
            idle_since = time.time() if found else record.started_at
    return InstanceStatus(
        name=record.name, kernel=record.kernel, image=record.image,
        state="running" if record.running() else "dead", pid=record.pid, kernels=len(live),
        started_at=record.started_at, idle_since=idle_since, idle_timeout=record.idle_timeout,
        reaper=reaper_running(d),
    )


def instance_dirs() -> list[Path]:
    """State directories of this host's instances (with or without a live record)."""
    base = root()
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def list_instances() -> list[InstanceStatus]:
    """Our instances on this host (other nodes' instances live in other host dirs)."""
    found = []
    for d in instance_dirs():
        st = status(d)
        if st is not None:
            found.append(st)
    return found


def damaged_records() -> list[str]:
    """One sentence per instance of this host whose record is damaged (``list_instances`` skips them;
    ``hpc-kernels gc`` stops such an instance)."""
    found = []
    for d in instance_dirs():
        problem = record_problem(d) if read_record(d) is None else None
        if problem:
            found.append(f"{problem}; 'hpc-kernels gc' stops instance {d.name} and removes it.")
    return found


def _stop_locked(d: Path, record: InstanceRecord) -> int:
    """Stop the instance of ``record`` (we hold its lock) and everything attached; kernels it had."""
    if record.host != paths.hostname():  # pragma: no cover - host dirs make this impossible
        raise HpcKernelsError(f"instance '{record.name}' belongs to node {record.host}, not this one.")
    attached = [a for a in attachments(d) if a.alive()]
    if record.running():
        binary = record.binary if os.access(record.binary, os.X_OK) else apptainer.find_binary()
        stopped = apptainer.stop_instance(binary, record.name, timeout=STOP_TIMEOUT)
        if not stopped or record.running():
            apptainer.stop_instance(binary, record.name, force=True, timeout=STOP_TIMEOUT)
        if record.running():
            _kill(record.pid)
    # Stopping the instance ends its PID namespace, hence the kernels in it; their runtime
    # processes (the former launchers) and anything marked are killed too, to be sure.
    for att in attached:
        if att.alive():
            _kill(att.pid)
    clear_leftovers(record)
    forget(d)
    return len(attached)


@dataclass(frozen=True)
class Stopped:
    """What ``stop`` did to one instance."""

    name: str
    was_running: bool
    kernels: int  # attached when it was stopped (they are gone now)


def stop(name: str) -> Stopped:
    """Stop our instance ``name`` on this host, killing the kernels attached to it."""
    d = instance_dir(name)
    with _lock(d / "lock"):
        record = read_record(d)
        if record is None:
            raise HpcKernelsError(f"no instance named '{name}' on this node ({paths.hostname()}); "
                                  "see 'hpc-kernels instances'.")
        was_running = record.running()
        kernels = _stop_locked(d, record)
    return Stopped(name, was_running, kernels)


def resolve_names(names: list[str], all_: bool) -> list[str]:
    """Instance names for ``stop``: instance names as given, a kernel name meaning all its instances."""
    known = list_instances()
    if all_:
        return [s.name for s in known]
    chosen: list[str] = []
    for name in names:
        matches = [s.name for s in known if name in (s.name, s.kernel)]
        if not matches:
            raise HpcKernelsError(f"no instance or kernel named '{name}' has an instance on this node "
                                  f"({paths.hostname()}); see 'hpc-kernels instances'.")
        chosen += [m for m in matches if m not in chosen]
    return chosen
