"""Submitting ``build --slurm``'s jobs (``sbatch --parsable``), the record of each
(:class:`~hpc_kernels.model.JobRecord` in ``<state dir>/jobs``), and forgetting finished ones.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpc_kernels import paths
from hpc_kernels.adapters.slurm import Slurm
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.model import JobKind, JobRecord, KernelEntry, TaskRecord
from hpc_kernels.slurm import (
    INSTALL_TIME,
    JobOptions,
    PlannedJob,
    dependency_args,
    jobs_dir,
    logs_dir,
    plan_build,
    plan_install,
)
from hpc_kernels.slurm_records import load_records, statuses
from hpc_kernels.slurm_settings import DEFAULT_TIME, time_minutes

#: ``build --slurm --wait`` gives up this long after the jobs' time limits (queueing, start-up).
WAIT_MARGIN = 600.0
#: Submitting prunes the records of jobs that ended more than this many days ago.
AUTO_PRUNE_DAYS = 30.0


@dataclass(frozen=True)
class SubmittedJob:
    """A job we submitted (and recorded)."""

    job_id: str
    kind: JobKind
    kernels: tuple[str, ...]
    tasks: tuple[TaskRecord, ...]
    record: Path
    depends_on: str | None = None


# ----------------------------------------------------------------------------- submitting


def submit(plan: PlannedJob, registry: Path, *, depends_on: str | None = None,
           slurm: Slurm | None = None) -> SubmittedJob:
    """Submit ``plan`` with ``sbatch --parsable``; record it (and its script) in :func:`jobs_dir`."""
    client = slurm or Slurm()
    # Slurm does not create the directory of --output: a missing one fails the job silently.
    paths.private(logs_dir())  # per-user state: 0700 (older versions: 0755)
    paths.private(jobs_dir())
    args = list(plan.sbatch_args) + (dependency_args(depends_on) if depends_on else [])
    job_id = client.submit(plan.script, args)
    tasks = _tasks(job_id, plan)
    script_path = jobs_dir() / f"{job_id}.sbatch"
    atomic_write(script_path, plan.script, private=True)
    options = plan.options
    record = JobRecord(
        job_id=job_id, kind=plan.kind, kernels=plan.kernels, tasks=tasks, submitted_at=time.time(),
        array=plan.array, registry=str(registry), depends_on=depends_on, host=paths.hostname(),
        script=str(script_path), sbatch_args=tuple(args),
        options=(("time", options.time), ("mem", options.mem), ("cpus", options.cpus),
                 ("account", options.account), ("partition", options.partition),
                 ("modules", list(options.modules)), ("extra_args", list(options.extra_args))),
    )
    path = jobs_dir() / f"{job_id}.json"
    atomic_write(path, json.dumps(record.to_json(), indent=1) + "\n", private=True)
    return SubmittedJob(job_id, plan.kind, plan.kernels, tasks, path, depends_on)


def _tasks(job_id: str, plan: PlannedJob) -> tuple[TaskRecord, ...]:
    if plan.array:
        return tuple(
            TaskRecord(f"{job_id}_{i}", name, plan.output.replace("%A", job_id).replace("%a", str(i)))
            for i, name in enumerate(plan.kernels)
        )
    return (TaskRecord(job_id, ", ".join(plan.kernels), plan.output.replace("%j", job_id)),)


def submit_builds(entries: Sequence[KernelEntry], registry: Path, options: JobOptions, *, apptainer_dir: str,
                  build_args: Sequence[str] = (), install: Sequence[str] = (),
                  slurm: Slurm | None = None) -> list[SubmittedJob]:
    """One build job (an array for several kernels), then the install job of ``install`` (afterok).

    With nothing to build, the install job (if any) runs without a dependency. ``apptainer_dir``: as
    :func:`~hpc_kernels.slurm.plan_build` takes it.
    """
    client = slurm or Slurm()
    auto_prune(client)
    submitted: list[SubmittedJob] = []
    build_job: str | None = None
    if entries:
        job = submit(plan_build(entries, registry, options, apptainer_dir=apptainer_dir, build_args=build_args),
                     registry, slurm=client)
        submitted.append(job)
        build_job = job.job_id
    if install:
        submitted.append(submit(plan_install(install, registry, options), registry,
                                depends_on=build_job, slurm=client))
    return submitted


def default_wait_timeout(options: JobOptions, jobs: Sequence[SubmittedJob]) -> float:
    """How long ``--wait`` waits by default: the time limits of the submitted jobs plus :data:`WAIT_MARGIN`."""
    build_limit = options.time_limit_seconds() or (time_minutes(DEFAULT_TIME) or 60.0) * 60
    install_limit = (time_minutes(INSTALL_TIME) or 10.0) * 60
    total = sum(build_limit if j.kind == JobKind.BUILD else install_limit for j in jobs)
    return total + WAIT_MARGIN


# ----------------------------------------------------------------------------- pruning

_JOB_ID_RE = re.compile(r"^\d+$")
_TASK_ID_RE = re.compile(r"^\d+(?:_\d+)?$")
_LOG_NAME_RE = re.compile(r"^(?:build|install|kernel)-\d+(?:_\d+)?\.out$")


@dataclass(frozen=True)
class PrunedJob:
    """A finished job whose record we removed, and the files that went with it."""

    job_id: str
    kind: JobKind
    kernels: tuple[str, ...]
    files: tuple[Path, ...]


def prune(older_than_days: float, *, slurm: Slurm | None = None, now: float | None = None) -> list[PrunedJob]:
    """Forget jobs submitted more than ``older_than_days`` ago that have ended (every task final).

    Removes only what hpc-kernels wrote for them: the record (``<job>.json``), its script
    (``<job>.sbatch``), the exit files of its tasks, and their Slurm logs when they are in
    :func:`logs_dir` under the names we chose. Jobs still pending or running are kept.
    """
    cutoff = (time.time() if now is None else now) - older_than_days * 86400
    old = [r for r in load_records()
           if r.submitted_at <= cutoff and _JOB_ID_RE.match(r.job_id)]
    if not old:
        return []
    rows = statuses(old, slurm)
    running = {s.job_id for s in rows if not s.final}
    directory, logs = jobs_dir(), logs_dir()
    pruned: list[PrunedJob] = []
    for rec in old:
        job = rec.job_id
        if job in running:
            continue
        candidates = [directory / f"{job}.sbatch"]
        for task in rec.tasks:
            if _TASK_ID_RE.match(task.task_id):
                candidates.append(directory / f"{task.task_id}.exit")
            log = Path(task.log)
            if log.parent == logs and _LOG_NAME_RE.match(log.name):
                candidates.append(log)
        # The record goes last: if anything fails on the way, the next prune finds the job again.
        candidates.append(directory / f"{job}.json")
        removed = []
        for path in candidates:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        pruned.append(PrunedJob(job, rec.kind, rec.kernels, tuple(removed)))
    return pruned


def auto_prune(slurm: Slurm | None = None) -> None:
    """Best-effort :func:`prune` of jobs older than :data:`AUTO_PRUNE_DAYS` (never fails a submission)."""
    with contextlib.suppress(HpcKernelsError, OSError):
        prune(AUTO_PRUNE_DAYS, slurm=slurm)


def cancel_ours(job_ids: Iterable[str], slurm: Slurm | None = None) -> None:
    """``scancel`` jobs of ours (tests and Ctrl-C during --wait use this)."""
    (slurm or Slurm()).cancel(job_ids)

