"""``hpc-kernels gc``'s sweepers for Apptainer: instance state whose instance is gone, instances and
processes of ours nothing tracks, and what exec-mode kernels left when their watcher was killed too.
"""

from __future__ import annotations

import os
import re
import time

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths, procfs
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.leftovers import Leftover, in_use
from hpc_kernels.runtimes.apptainer.execrecord import START_GRACE, leftovers, record_paths, remove_record
from hpc_kernels.runtimes.apptainer.execrecord import read_record as read_kernel_record
from hpc_kernels.runtimes.apptainer.instance import (
    DIGEST_LEN,
    ENV_INSTANCE,
    NAME_PREFIX,
    NAME_RE,
    STOP_TIMEOUT,
    _clean,
    owner_tag,
    root,
    user_name,
)
from hpc_kernels.runtimes.apptainer.reaper import _stop_damaged, spawn_reaper
from hpc_kernels.runtimes.apptainer.records import (
    _kill,
    _lock,
    attachments,
    forget,
    helpers_left,
    kill_marked,
    marked_processes,
    read_record,
    reaper_running,
    record_problem,
)
from hpc_kernels.runtimes.apptainer.status import instance_dirs
from hpc_kernels.runtimes.apptainer.watcher import spawn

# ----------------------------------------------------------------------------- gc sweepers


def sweep_state(dry_run: bool = False) -> list[Leftover]:
    """gc: forget dead instances, restart missing reapers, stop untracked instances named like ours."""

    found: list[Leftover] = []
    tracked = set()
    for d in instance_dirs():
        tracked.add(d.name)
        record = read_record(d)
        if record is not None and record.running():
            if not reaper_running(d):
                found.append(Leftover("instances", d.name, "restarted its reaper",
                                     "no process would stop it when idle"))
                if not dry_run:
                    spawn_reaper(d)
            continue
        problem = record_problem(d) if record is None else None
        if problem:  # without its record nothing can tell when it is idle: stop it by name
            findings = [Leftover("instances", d.name, "stopped", f"{problem}; its state is removed too")]
        else:
            why = "instance not running" if record is not None else "no instance record"
            findings = [Leftover("instances", d.name, "removed stale state", why)]
        # Its kernels' processes are the "orphans" sweeper's (after this one); Apptainer's helpers are ours.
        helpers = helpers_left(record, late=True) if record is not None else []
        findings += [Leftover("orphans", f"pid {p.pid}", "killed",
                             f"{p.comm} of instance {d.name}, which is not running") for p in helpers]
        if dry_run:
            found += findings
            continue
        with _lock(d / "lock", blocking=False) as held:
            if not held:  # a launch is starting it right now
                continue
            again = read_record(d)
            if again is not None and again.running():
                continue
            procfs.kill(p.ref for p in helpers)
            if again is None and record_problem(d):
                _stop_damaged(d)
            forget(d)
            found += findings
    found += _sweep_untracked(tracked, dry_run)
    return found


def our_name_pattern(user: str, host: str, owner: str) -> re.Pattern[str]:
    """Names this state tree would give this user's instances on this host."""
    head = f"{re.escape(NAME_PREFIX)}.+-{re.escape(_clean(user))}-{re.escape(_clean(host))}"
    return re.compile(rf"^{head}(-j[A-Za-z0-9._]+)?-{owner}[0-9a-f]{{{DIGEST_LEN}}}$")


def _sweep_untracked(tracked: set[str], dry_run: bool) -> list[Leftover]:

    if not in_use("apptainer"):  # no kernel of ours uses Apptainer: none of its instances can be ours
        return []
    try:
        binary = apptainer.find_binary()
    except HpcKernelsError:
        return []
    pattern = our_name_pattern(user_name(), paths.hostname(), owner_tag())
    found = []
    for listed in apptainer.list_instances(binary):
        if listed.name in tracked or not pattern.match(listed.name):
            continue
        found.append(Leftover("instances", listed.name, "stopped",
                             "an instance of ours with no state: no reaper watches it"))
        if not dry_run:
            apptainer.stop_instance(binary, listed.name, timeout=STOP_TIMEOUT)
            kill_marked(listed.name)
    return found


def sweep_orphans(dry_run: bool = False) -> list[Leftover]:
    """gc: kill kernel processes whose instance is gone or whose own attachment has ended."""

    names: set[str] = set()
    want = f"{ENV_INSTANCE}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        names.update(v[len(want) :].decode(errors="replace") for v in env if v.startswith(want))
    # Only names this state tree gives: processes of instances another state tree tracks are not ours.
    ours = our_name_pattern(user_name(), paths.hostname(), owner_tag())
    found: list[Leftover] = []
    for name in sorted(n for n in names if NAME_RE.match(n) and ours.match(n)):
        for pid in _orphans_of(name):
            found.append(Leftover("orphans", f"pid {pid}", "killed",
                                 f"kernel process of {name}, whose kernel has ended"))
            if not dry_run:
                _kill(pid)
    return found


def _orphans_of(name: str) -> list[int]:
    """Processes marked with instance ``name`` that no live attachment of a running instance owns."""
    d = root() / name
    if not d.is_dir():  # no state at all: nothing of ours can own them (and create no dir for them)
        return [pid for pid, _att in marked_processes(name)]
    with _lock(d / "lock", blocking=False) as held:
        if not held:  # a launch or stop is busy with this instance: look again next time
            return []
        record = read_record(d)
        live = {a.id for a in attachments(d) if a.alive()} if record and record.running() else set()
        return [pid for pid, att in marked_processes(name) if att not in live]


# ----------------------------------------------------------------------------- exec-mode kernels


def sweep_kernels(dry_run: bool = False) -> list[Leftover]:
    """``hpc-kernels gc``: what exec-mode kernels left when their watcher could not clean up (it was
    killed too): leftover processes are killed, records removed; a live kernel whose watcher is gone
    gets a new one."""
    found: list[Leftover] = []
    for path in record_paths():
        try:
            record = read_kernel_record(path)
        except (OSError, ValueError) as exc:
            found.append(Leftover("kernels", path, "removed", f"a damaged record ({exc})"))
            if not dry_run:
                remove_record(path)
            continue
        if record is None or (record.watcher is not None and record.watcher.alive()):
            continue
        if record.watcher is None and time.time() - record.created < START_GRACE:
            continue  # its watcher is starting
        if record.launcher.alive():
            found.append(Leftover("kernels", f"{record.kernel} (pid {record.launcher.pid})",
                                 "restarted its watcher", "its watcher is gone: nothing would clean up after it"))
            if not dry_run:
                spawn(path)
            continue
        left = leftovers(record, late=True)
        for p in left:
            found.append(Leftover("kernels", f"pid {p.pid}", "killed",
                                 f"{p.comm} left by kernel '{record.kernel}', whose launcher and watcher are gone"))
        found.append(Leftover("kernels", f"{record.kernel} ({record.id})", "removed its record",
                             "its launcher and watcher are gone"))
        if not dry_run:
            procfs.kill(p.ref for p in left)
            remove_record(path)
    return found
