"""``hpc-kernels gc``'s sweeper of job kernels: jobs whose launcher and watcher are both gone are cancelled.
"""

from __future__ import annotations

from hpc_kernels import paths
from hpc_kernels.adapters.slurm import Slurm
from hpc_kernels.leftovers import Leftover
from hpc_kernels.runtimes.job.session import (
    JOB_PREFIX,
    job_name,
    launcher_alive,
    load_sessions,
    remove_session,
    sessions_dir,
)
from hpc_kernels.runtimes.job.watcher import cancel_session

# ----------------------------------------------------------------------------- gc


def sweep(dry_run: bool = False) -> list[Leftover]:
    """``hpc-kernels gc``: cancel kernel jobs whose launcher and watcher are both gone (this host's), forget
    sessions whose job is over, and name kernel jobs with no record here (left alone: maybe another
    state directory's)."""
    if not sessions_dir().is_dir():
        return []
    client = Slurm()
    if not client.available():
        return []
    found = []
    live = client.named(JOB_PREFIX)
    claimed = set()
    for session in load_sessions():
        sid, job = str(session["sid"]), str(session.get("job_id") or "")
        claimed.add(job_name(str(session.get("kernel")), sid))
        if session.get("host") != paths.hostname() or launcher_alive(session):
            continue
        if launcher_alive(session, "watcher_pid") and session.get("state") != "ended":
            continue  # its watcher is deciding (a restart may come)
        running = job in live if not session.get("reused") else launcher_alive(session, "srun_pid")
        if running:
            found.append(Leftover("kernel-jobs", f"job {job} ({session.get('kernel')})",
                                    "would cancel" if dry_run else "cancelled",
                                    "its launcher and watcher are gone"))
            if not dry_run:
                cancel_session(session, "hpc-kernels gc: its launcher and watcher are gone")
        if not dry_run:
            remove_session(sid)
    for job, name in sorted(live.items()):
        if name not in claimed:
            found.append(Leftover("kernel-jobs", f"job {job} ({name})", "left alone",
                                    f"no record of it in {sessions_dir()}; 'scancel {job}' if nothing uses it"))
    return found
