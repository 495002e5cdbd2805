"""How our Slurm jobs stand: the records ``build --slurm`` keeps of every job it submitted
(``<state dir>/jobs``, :class:`~hpc_kernels.model.JobRecord`), read together with the exit code each job
script records, ``squeue``, ``scontrol`` and (when it answers) ``sacct``; waiting for jobs to end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpc_kernels.adapters.slurm import FINAL_STATES, JobInfo, Slurm
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import JobKind, JobRecord, TaskRecord
from hpc_kernels.proc import tail
from hpc_kernels.slurm import jobs_dir

FAILED_STATES = FINAL_STATES - {"COMPLETED"}
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class TaskStatus:
    """Where one task stands, from the best source that still knows it."""

    job_id: str
    task_id: str
    kind: JobKind
    kernel: str
    state: str
    reason: str = ""
    exit_code: str = ""
    source: str = ""
    log: str = ""
    submitted_at: float = 0.0
    log_tail: str = field(default="", compare=False)

    @property
    def final(self) -> bool:
        """It will not run again."""
        return self.state in FINAL_STATES

    @property
    def failed(self) -> bool:
        """It ended without success."""
        return self.state in FAILED_STATES

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {"job_id": self.job_id, "task_id": self.task_id, "kind": self.kind,
                "kernel": self.kernel, "state": self.state, "reason": self.reason,
                "exit_code": self.exit_code, "source": self.source, "log": self.log,
                "submitted_at": self.submitted_at, "log_tail": self.log_tail}


# ----------------------------------------------------------------------------- states


def load_records() -> list[JobRecord]:
    """Our job records, newest first (files we did not write are ignored)."""
    records = []
    directory = jobs_dir()
    if not directory.is_dir():
        return []
    for path in directory.glob("*.json"):
        try:
            record = JobRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if record is not None:
            records.append(record)
    records.sort(key=lambda r: (r.submitted_at, r.job_id), reverse=True)
    return records


def read_exit(task_id: str) -> int | None:
    """The exit code the job script recorded for ``task_id``, or None."""
    try:
        return int((jobs_dir() / f"{task_id}.exit").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a job's output file ("" when it does not exist)."""
    try:
        return tail(Path(path).read_text(encoding="utf-8", errors="replace"), lines)
    except OSError:
        return ""


def statuses(records: Iterable[JobRecord] | None = None, slurm: Slurm | None = None) -> list[TaskStatus]:
    """The state of every task of ``records`` (default: all of ours), failed ones with their log tail.

    Sources, best first: the exit code the job script recorded, squeue (live jobs), scontrol
    (recently finished), sacct (when the cluster has accounting); an install job whose build job
    failed was cancelled by Slurm (--kill-on-invalid-dep).
    """
    client = slurm or Slurm()
    recs = list(load_records() if records is None else records)
    flat: list[tuple[JobRecord, TaskRecord]] = [(r, t) for r in recs for t in r.tasks]
    known: dict[str, JobInfo] = {}
    for _rec, task in flat:
        code = read_exit(task.task_id)
        if code is not None:
            known[task.task_id] = JobInfo(task.task_id, "COMPLETED" if code == 0 else "FAILED",
                                             "" if code == 0 else "NonZeroExitCode", str(code), "job record")
    open_jobs = sorted({r.job_id for r, t in flat if t.task_id not in known})
    if open_jobs:
        live = client.queue(open_jobs)
        known.update({k: v for k, v in live.items() if k not in known})
        for job in open_jobs:
            if any(t.task_id not in known for r, t in flat if r.job_id == job):
                known.update({k: v for k, v in client.control(job).items() if k not in known})
        missing = sorted({r.job_id for r, t in flat if t.task_id not in known})
        if missing:
            acct = client.accounting(missing) or {}
            known.update({k: v for k, v in acct.items() if k not in known})
    result: list[TaskStatus] = []
    by_job: dict[str, list[TaskStatus]] = {}
    for rec, task in flat:
        info = known.get(task.task_id)
        status = TaskStatus(
            job_id=rec.job_id, task_id=task.task_id, kind=rec.kind,
            kernel=task.kernel, state=info.state if info else "UNKNOWN",
            reason=info.reason if info else "no longer known to Slurm and no exit record "
                                            "(cancelled, timed out or lost)",
            exit_code=info.exit_code if info else "", source=info.source if info else "",
            log=task.log, submitted_at=rec.submitted_at,
        )
        by_job.setdefault(status.job_id, []).append(status)
        result.append(status)
    final: list[TaskStatus] = []
    for rec, status in zip((r for r, _t in flat), result):
        dep = rec.depends_on
        if status.source == "" and dep and any(s.failed for s in by_job.get(dep, [])):
            status = replace(status, state="CANCELLED", reason=f"its build job {dep} failed",
                             source="dependency")
        if status.failed and status.source != "dependency":
            status = replace(status, log_tail=log_tail(status.log))
        final.append(status)
    return final


class WaitTimeoutError(HpcKernelsError):
    """``wait`` gave up; the jobs keep running. ``rows``: every task then; ``unfinished``: those not ended."""

    def __init__(self, timeout: float, rows: Sequence[TaskStatus]) -> None:
        self.timeout = timeout
        self.rows = tuple(rows)
        self.unfinished = tuple(s for s in rows if not s.final)
        listed = ", ".join(f"{s.task_id} ({s.kind} of {s.kernel}: {s.state})" for s in self.unfinished)
        ids = " ".join(sorted({s.job_id for s in self.unfinished}, key=int))
        super().__init__(
            f"gave up waiting after {timeout:g} s; still not finished: {listed}. The job(s) keep running "
            f"(see 'hpc-kernels jobs'; cancel with 'scancel {ids}')."
        )


def wait(job_ids: Sequence[str], *, timeout: float | None = None, interval: float = 2.0,
         slurm: Slurm | None = None, on_poll: Callable[[list[TaskStatus]], None] = lambda _s: None,
         ) -> list[TaskStatus]:
    """Poll until every task of ``job_ids`` is final; after ``timeout`` seconds raise
    :class:`WaitTimeoutError` naming the unfinished tasks (nothing is cancelled)."""
    client = slurm or Slurm()
    wanted = {str(j) for j in job_ids}
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        records = [r for r in load_records() if r.job_id in wanted]
        current = statuses(records, client)
        on_poll(current)
        if all(s.final for s in current):
            return current
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeoutError(timeout or 0.0, current)
        pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(pause)


