"""Our records of Slurm jobs (:class:`JobRecord`, one per submitted job, with its array tasks). Not on the
launcher's path.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc_kernels.model.words import JobKind

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any




# ----------------------------------------------------------------------------- build jobs


#: The format of a job record (``<state dir>/jobs/<job>.json``).
JOB_RECORD_FORMAT = 1
#: Who wrote a record: a file without it in the jobs directory is not ours and is ignored.
GENERATOR = "hpc-kernels"


@dataclass(frozen=True)
class TaskRecord:
    """One task of a recorded job: an array task (one kernel) or the whole job."""

    task_id: str  # "123" or "123_4"
    kernel: str  # one kernel, or "a, b" for an install job
    log: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {"task_id": self.task_id, "kernel": self.kernel, "log": self.log}


@dataclass(frozen=True)
class JobRecord:
    """What hpc-kernels remembers of a Slurm job it submitted (``<state dir>/jobs/<job>.json``), so that
    ``hpc-kernels jobs`` works where ``sacct`` has no accounting."""

    job_id: str
    kind: JobKind
    kernels: tuple[str, ...]
    tasks: tuple[TaskRecord, ...]
    submitted_at: float = 0.0
    array: bool = False
    registry: str = ""
    depends_on: str | None = None
    host: str = ""
    script: str = ""
    sbatch_args: tuple[str, ...] = ()
    #: The job's resources as submitted (time, mem, cpus, account, partition, modules, extra_args).
    options: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The record as written (lists for tuples, ``options`` an object)."""
        return {
            "generator": GENERATOR, "format": JOB_RECORD_FORMAT, "job_id": self.job_id, "kind": self.kind,
            "kernels": list(self.kernels), "array": self.array, "registry": self.registry,
            "depends_on": self.depends_on, "submitted_at": self.submitted_at, "host": self.host,
            "script": self.script, "sbatch_args": list(self.sbatch_args), "options": dict(self.options),
            "tasks": [t.to_json() for t in self.tasks],
        }

    @classmethod
    def from_json(cls, data: Any) -> JobRecord | None:
        """The record of ``data`` (a parsed file), or None when it is not one of ours (another generator,
        no tasks, an unknown kind). Tasks without an id are left out; missing optional keys take defaults."""
        if not isinstance(data, dict) or data.get("generator") != GENERATOR or not isinstance(data.get("tasks"), list):
            return None
        kind = data.get("kind", JobKind.BUILD)
        if kind not in JobKind.words() or "job_id" not in data:
            return None
        tasks = tuple(TaskRecord(str(t["task_id"]), str(t.get("kernel", "")), str(t.get("log", "")))
                      for t in data["tasks"] if isinstance(t, dict) and "task_id" in t)
        depends = data.get("depends_on")
        options = data.get("options")
        try:
            submitted = float(data.get("submitted_at", 0))
        except (TypeError, ValueError):
            submitted = 0.0
        return cls(
            job_id=str(data["job_id"]), kind=JobKind(kind),
            kernels=tuple(str(k) for k in data.get("kernels", []) or []), tasks=tasks,
            submitted_at=submitted, array=bool(data.get("array", False)),
            registry=str(data.get("registry", "")), depends_on=None if depends is None else str(depends),
            host=str(data.get("host", "")), script=str(data.get("script", "")),
            sbatch_args=tuple(str(a) for a in data.get("sbatch_args", []) or []),
            options=tuple(options.items()) if isinstance(options, dict) else (),
        )
