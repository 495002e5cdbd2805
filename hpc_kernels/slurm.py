"""Prebuild images in Slurm jobs: batch scripts from templates, job arrays, afterok install chains,
and our own record of every job we submitted (``<state dir>/jobs``) so that ``hpc-kernels jobs``
works where ``sacct`` has no accounting.

Inside the job runs the very same ``hpc-kernels build NAME --registry <abs path>`` (through the
absolute path of this interpreter), so the incremental/atomic/locked rules of :mod:`hpc_kernels.build`
hold there too, and the image lands in its registry location. The job script records its exit
code in ``<state dir>/jobs/<job>[_<task>].exit``: that file, squeue, scontrol and (when it answers)
sacct together say how a job ended.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import __version__, paths, templates
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.runtimes.slurm import FINAL_STATES, JobInfo, Slurm
from hpc_kernels.slurm_settings import (
    DEFAULT_CPUS,
    DEFAULT_MEM,
    DEFAULT_TIME,
    UNSET,
    SlurmDefaults,
    mem_megabytes,
    time_minutes,
)

if TYPE_CHECKING:  # the registry (PyYAML) is not needed to parse build's flags
    from hpc_kernels.registry import KernelEntry

# DEFAULT_TIME, DEFAULT_MEM, DEFAULT_CPUS live in slurm_settings (imported below) so that `build`'s
# flags can show them without importing this module at every CLI start.
#: Loaded in the job when Lmod has them (the registry's ``slurm: modules`` replaces the list).
DEFAULT_MODULES = ("apptainer",)
#: ``build --slurm --wait`` gives up this long after the jobs' time limits (queueing, start-up).
WAIT_MARGIN = 600.0
#: Submitting prunes the records of jobs that ended more than this many days ago.
AUTO_PRUNE_DAYS = 30.0
#: The install job only writes a kernel.json.
INSTALL_TIME = "0:10:00"
INSTALL_MEM = "1G"

FAILED_STATES = FINAL_STATES - {"COMPLETED"}
RECORD_FORMAT = 1
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class JobOptions:
    """Resources of a job. ``explicit`` names the options set by a flag or the registry (not built-in)."""

    time: str = DEFAULT_TIME
    mem: str = DEFAULT_MEM
    cpus: int = DEFAULT_CPUS
    account: str | None = None
    partition: str | None = None
    explicit: tuple[str, ...] = ()
    modules: tuple[str, ...] = DEFAULT_MODULES
    #: The registry chose ``modules``: one that does not load fails the job (the default is best effort).
    require_modules: bool = False
    extra_args: tuple[str, ...] = ()

    def sbatch_args(self) -> list[str]:
        """Options set by a flag or the registry go on sbatch's command line too, where SBATCH_*
        variables cannot override them; then the registry's ``extra_args``."""
        values = {"time": self.time, "mem": self.mem, "cpus-per-task": str(self.cpus),
                  "account": self.account, "partition": self.partition}
        return [f"--{name}={values[name]}" for name in self.explicit if values.get(name)] + list(self.extra_args)

    def for_install(self) -> JobOptions:
        """The small job that installs kernelspecs after the build (same account and partition)."""
        keep = tuple(n for n in self.explicit if n in ("account", "partition"))
        return replace(self, time=INSTALL_TIME, mem=INSTALL_MEM, cpus=1, explicit=keep, extra_args=())

    def time_limit_seconds(self) -> float | None:
        """The build job's time limit in seconds (None when it is not in one of Slurm's formats)."""
        minutes = time_minutes(self.time)
        return None if minutes is None else minutes * 60


def job_options(entries: Sequence[KernelEntry], flags: SlurmDefaults = UNSET) -> JobOptions:
    """The options of one build job for ``entries``: a flag > the kernel's ``slurm:`` > ``defaults: slurm:``
    > the built-in DRAC defaults.

    A job array has one set of resources: it gets the largest time, memory and CPU count any of its
    kernels asks for; kernels that ask for different accounts, partitions, modules or extra sbatch
    options cannot share a job (:class:`HpcKernelsError` says which and how to proceed).
    """
    wanted = [flags.over(e.slurm) for e in entries] or [flags]
    names = [e.name for e in entries]

    def largest(key: str, measure: Callable[[str], float | None]) -> str | None:
        # A flag is in every `wanted` already; an unparsable one is left for sbatch to reject.
        values: list[str] = [getattr(w, key) for w in wanted if getattr(w, key) is not None]
        return max(values, key=lambda v: measure(v) or 0.0) if values else None

    def single(key: str, flag: str, *, unset_differs: bool) -> Any:
        # An unset account or partition leaves the choice to the others; unset modules or extra_args
        # mean the built-in ones, which differ from a kernel's own.
        chosen = {n: getattr(w, key) for n, w in zip(names, wanted)
                  if unset_differs or getattr(w, key) is not None}
        distinct = list(dict.fromkeys(chosen.values()))
        if len(distinct) > 1:
            shown = "; ".join(f"{n}: {_show(v)}" for n, v in chosen.items())
            fix = f"pass {flag} to use one for all, or " if flag else ""
            raise HpcKernelsError(
                f"the kernels of one job array must share their slurm '{key}', but they differ ({shown}): "
                f"{fix}build them with separate 'hpc-kernels build --slurm' commands."
            )
        return distinct[0] if distinct else None

    time = largest("time", time_minutes)
    mem = largest("mem", mem_megabytes)
    cpus = max((w.cpus for w in wanted if w.cpus is not None), default=None)
    account = single("account", "--account", unset_differs=False)
    partition = single("partition", "--partition", unset_differs=False)
    modules = single("modules", "", unset_differs=True)
    extra = single("extra_args", "", unset_differs=True)
    given = {"time": time, "mem": mem, "cpus-per-task": cpus, "account": account, "partition": partition}
    return JobOptions(
        time=time or DEFAULT_TIME, mem=mem or DEFAULT_MEM, cpus=cpus or DEFAULT_CPUS,
        account=account, partition=partition,
        explicit=tuple(k for k, v in given.items() if v is not None),
        modules=DEFAULT_MODULES if modules is None else tuple(modules),
        require_modules=modules is not None, extra_args=tuple(extra or ()),
    )


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    return "[" + ", ".join(value) + "]" if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class PlannedJob:
    """A rendered batch script and how to submit it."""

    kind: str  # build | install
    kernels: tuple[str, ...]
    script: str
    sbatch_args: tuple[str, ...]
    output: str  # sbatch --output pattern (%j, or %A_%a for arrays)
    options: JobOptions = JobOptions()

    @property
    def array(self) -> bool:
        """One task per kernel."""
        return self.kind == "build" and len(self.kernels) > 1


@dataclass(frozen=True)
class Task:
    """One unit of work of a job: an array task (one kernel) or the whole job."""

    task_id: str  # "123" or "123_4"
    kernel: str  # one kernel, or "a, b" for an install job
    log: Path


@dataclass(frozen=True)
class SubmittedJob:
    """A job we submitted (and recorded)."""

    job_id: str
    kind: str
    kernels: tuple[str, ...]
    tasks: tuple[Task, ...]
    record: Path
    depends_on: str | None = None


@dataclass(frozen=True)
class TaskStatus:
    """Where one task stands, from the best source that still knows it."""

    job_id: str
    task_id: str
    kind: str
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


# ----------------------------------------------------------------------------- locations


def jobs_dir() -> Path:
    """Our job records and the exit codes the job scripts write: ``<state dir>/jobs``."""
    return paths.state_dir() / "jobs"


def logs_dir() -> Path:
    """Slurm output files of our jobs: ``<log dir>/slurm``."""
    return paths.log_dir() / "slurm"


# ----------------------------------------------------------------------------- rendering


#: What an ``#SBATCH`` line cannot hold in a value: sbatch splits at white space, reads quotes and
#: backslashes, and starts a comment at '#'; a line break would start a line of shell.
_DIRECTIVE_UNSAFE = re.compile(r"[\s\"'\\#\x00-\x1f\x7f-\x9f]")


def _directive_value(name: str, value: str, fix: str) -> str:
    """``value`` for ``#SBATCH --name=value``; an HpcKernelsError (with ``fix``) when sbatch would misread it."""
    if _DIRECTIVE_UNSAFE.search(value):
        raise HpcKernelsError(f"the job's --{name} {value!r} cannot be written on an #SBATCH line (it contains "
                              f"white space, a quote, a backslash, '#' or a control character): {fix}.")
    return value


def _directives(options: JobOptions, array: int = 0) -> templates.Block:
    lines = []
    if options.account:
        lines.append(f"#SBATCH --account={_directive_value('account', options.account, 'give a plain name')}")
    if options.partition:
        lines.append(
            f"#SBATCH --partition={_directive_value('partition', options.partition, 'give a plain name')}")
    if array > 1:
        lines.append(f"#SBATCH --array=0-{array - 1}")
    return templates.Block("".join(line + "\n" for line in lines))


def _output(pattern: str) -> str:
    """The ``--output`` of a job: our log directory, which comes from the environment."""
    return _directive_value("output", str(logs_dir() / pattern),
                            "set HPC_KERNELS_STATE (or XDG_STATE_HOME) to a plain path")


def _what(names: Sequence[str]) -> str:
    return f"kernel '{names[0]}'" if len(names) == 1 else f"kernels {', '.join(names)}"


def submit_time_apptainer_dir() -> str:
    """The directory of the Apptainer found now (a PATH fallback for the job), or ""."""
    from hpc_kernels.runtimes.apptainer.cli import find_binary

    try:
        return str(Path(find_binary()).parent)
    except RuntimeNotFoundError:
        return ""


def plan_build(entries: Sequence[KernelEntry], registry: Path, options: JobOptions, *,
               build_args: Sequence[str] = (), python: str = sys.executable,
               apptainer_dir: str | None = None) -> PlannedJob:
    """The batch script that builds ``entries`` (one array task per kernel when there are several).

    ``build_args`` are extra flags of the ``hpc-kernels build`` run in the job (``--force``...).
    """
    if not entries:
        raise HpcKernelsError("no kernel to build in a job.")
    from hpc_kernels.build import recipe

    for entry in entries:  # a recipe the job's build would refuse is refused before submitting
        if entry.recipe is not None:
            recipe.check(entry.recipe)
    names = tuple(e.name for e in entries)
    array = len(names) > 1
    output = _output("build-%A_%a.out" if array else "build-%j.out")
    command = " ".join(shlex.quote(a) for a in (python, "-m", "hpc_kernels", "build"))
    command += f' "$kernel" --registry {shlex.quote(str(registry))}'
    command += "".join(" " + shlex.quote(a) for a in build_args)
    script = templates.render(
        "build.sbatch.tmpl",
        version=__version__,
        what=_what(names),
        job_name=f"hpck-build-{names[0]}" if not array else f"hpck-build-{len(names)}-kernels",
        time=options.time,
        mem=options.mem,
        cpus=str(options.cpus),
        output=output,
        directives=_directives(options, len(names)),
        kernels=" ".join(shlex.quote(n) for n in names),
        modules=" ".join(shlex.quote(m) for m in options.modules),
        require_modules="1" if options.require_modules else "0",
        apptainer_dir=shlex.quote(submit_time_apptainer_dir() if apptainer_dir is None else apptainer_dir),
        command=command,
        jobs_dir=shlex.quote(str(jobs_dir())),
    )
    return PlannedJob("build", names, script, tuple(options.sbatch_args()), output, options)


def plan_install(names: Sequence[str], registry: Path, options: JobOptions, *,
                 python: str = sys.executable) -> PlannedJob:
    """The batch script that installs the kernelspecs of ``names`` (run after their build job)."""
    opts = options.for_install()
    output = _output("install-%j.out")
    argv = [python, "-m", "hpc_kernels", "install", *names, "--registry", str(registry)]
    script = templates.render(
        "install.sbatch.tmpl",
        version=__version__,
        what=_what(names),
        job_name="hpck-install",
        time=opts.time,
        mem=opts.mem,
        cpus=str(opts.cpus),
        output=output,
        directives=_directives(opts),
        command=" ".join(shlex.quote(a) for a in argv),
        jobs_dir=shlex.quote(str(jobs_dir())),
    )
    return PlannedJob("install", tuple(names), script, tuple(opts.sbatch_args()), output, opts)


def dependency_args(build_job: str) -> list[str]:
    """``afterok`` on the whole build job (every array task); cancelled, not stuck, when it fails."""
    return [f"--dependency=afterok:{build_job}", "--kill-on-invalid-dep=yes"]


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
    record = {
        "generator": "hpc-kernels", "format": RECORD_FORMAT, "job_id": job_id, "kind": plan.kind,
        "kernels": list(plan.kernels), "array": plan.array, "registry": str(registry),
        "depends_on": depends_on, "submitted_at": time.time(), "host": paths.hostname(),
        "script": str(script_path), "sbatch_args": args,
        "options": {"time": plan.options.time, "mem": plan.options.mem, "cpus": plan.options.cpus,
                    "account": plan.options.account, "partition": plan.options.partition,
                    "modules": list(plan.options.modules), "extra_args": list(plan.options.extra_args)},
        "tasks": [{"task_id": t.task_id, "kernel": t.kernel, "log": str(t.log)} for t in tasks],
    }
    path = jobs_dir() / f"{job_id}.json"
    atomic_write(path, json.dumps(record, indent=1) + "\n", private=True)
    return SubmittedJob(job_id, plan.kind, plan.kernels, tasks, path, depends_on)


def _tasks(job_id: str, plan: PlannedJob) -> tuple[Task, ...]:
    if plan.array:
        return tuple(
            Task(f"{job_id}_{i}", name, Path(plan.output.replace("%A", job_id).replace("%a", str(i))))
            for i, name in enumerate(plan.kernels)
        )
    return (Task(job_id, ", ".join(plan.kernels), Path(plan.output.replace("%j", job_id))),)


def submit_builds(entries: Sequence[KernelEntry], registry: Path, options: JobOptions, *,
                  build_args: Sequence[str] = (), install: Sequence[str] = (),
                  slurm: Slurm | None = None) -> list[SubmittedJob]:
    """One build job (an array for several kernels), then the install job of ``install`` (afterok).

    With nothing to build, the install job (if any) runs without a dependency.
    """
    client = slurm or Slurm()
    auto_prune(client)
    submitted: list[SubmittedJob] = []
    build_job: str | None = None
    if entries:
        job = submit(plan_build(entries, registry, options, build_args=build_args), registry, slurm=client)
        submitted.append(job)
        build_job = job.job_id
    if install:
        submitted.append(submit(plan_install(install, registry, options), registry,
                                depends_on=build_job, slurm=client))
    return submitted


# ----------------------------------------------------------------------------- states


def load_records() -> list[dict[str, Any]]:
    """Our job records, newest first (files we did not write are ignored)."""
    records = []
    directory = jobs_dir()
    if not directory.is_dir():
        return []
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("generator") == "hpc-kernels" \
                and isinstance(data.get("tasks"), list):
            records.append(data)
    records.sort(key=lambda r: (float(r.get("submitted_at", 0)), str(r.get("job_id", ""))), reverse=True)
    return records


def read_exit(task_id: str) -> int | None:
    """The exit code the job script recorded for ``task_id``, or None."""
    try:
        return int((jobs_dir() / f"{task_id}.exit").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a job's output file ("" when it does not exist)."""
    from hpc_kernels.proc import tail

    try:
        return tail(Path(path).read_text(encoding="utf-8", errors="replace"), lines)
    except OSError:
        return ""


def statuses(records: Iterable[dict[str, Any]] | None = None, slurm: Slurm | None = None) -> list[TaskStatus]:
    """The state of every task of ``records`` (default: all of ours), failed ones with their log tail.

    Sources, best first: the exit code the job script recorded, squeue (live jobs), scontrol
    (recently finished), sacct (when the cluster has accounting); an install job whose build job
    failed was cancelled by Slurm (--kill-on-invalid-dep).
    """
    client = slurm or Slurm()
    recs = list(load_records() if records is None else records)
    flat: list[tuple[dict[str, Any], dict[str, Any]]] = [(r, t) for r in recs for t in r["tasks"]]
    known: dict[str, JobInfo] = {}
    for _rec, task in flat:
        code = read_exit(task["task_id"])
        if code is not None:
            known[task["task_id"]] = JobInfo(task["task_id"], "COMPLETED" if code == 0 else "FAILED",
                                             "" if code == 0 else "NonZeroExitCode", str(code), "job record")
    open_jobs = sorted({str(r["job_id"]) for r, t in flat if t["task_id"] not in known})
    if open_jobs:
        live = client.queue(open_jobs)
        known.update({k: v for k, v in live.items() if k not in known})
        for job in open_jobs:
            if any(t["task_id"] not in known for r, t in flat if str(r["job_id"]) == job):
                known.update({k: v for k, v in client.control(job).items() if k not in known})
        missing = sorted({str(r["job_id"]) for r, t in flat if t["task_id"] not in known})
        if missing:
            acct = client.accounting(missing) or {}
            known.update({k: v for k, v in acct.items() if k not in known})
    result: list[TaskStatus] = []
    by_job: dict[str, list[TaskStatus]] = {}
    for rec, task in flat:
        info = known.get(task["task_id"])
        status = TaskStatus(
            job_id=str(rec["job_id"]), task_id=task["task_id"], kind=str(rec.get("kind", "build")),
            kernel=task["kernel"], state=info.state if info else "UNKNOWN",
            reason=info.reason if info else "no longer known to Slurm and no exit record "
                                            "(cancelled, timed out or lost)",
            exit_code=info.exit_code if info else "", source=info.source if info else "",
            log=task["log"], submitted_at=float(rec.get("submitted_at", 0)),
        )
        by_job.setdefault(status.job_id, []).append(status)
        result.append(status)
    final: list[TaskStatus] = []
    for rec, status in zip((r for r, _t in flat), result):
        dep = rec.get("depends_on")
        if status.source == "" and dep and any(s.failed for s in by_job.get(str(dep), [])):
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


def default_wait_timeout(options: JobOptions, jobs: Sequence[SubmittedJob]) -> float:
    """How long ``--wait`` waits by default: the time limits of the submitted jobs plus :data:`WAIT_MARGIN`."""
    build_limit = options.time_limit_seconds() or (time_minutes(DEFAULT_TIME) or 60.0) * 60
    install_limit = (time_minutes(INSTALL_TIME) or 10.0) * 60
    total = sum(build_limit if j.kind == "build" else install_limit for j in jobs)
    return total + WAIT_MARGIN


def wait(job_ids: Sequence[str], *, timeout: float | None = None, interval: float = 2.0,
         slurm: Slurm | None = None, on_poll: Callable[[list[TaskStatus]], None] = lambda _s: None,
         ) -> list[TaskStatus]:
    """Poll until every task of ``job_ids`` is final; after ``timeout`` seconds raise
    :class:`WaitTimeoutError` naming the unfinished tasks (nothing is cancelled)."""
    client = slurm or Slurm()
    wanted = {str(j) for j in job_ids}
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        records = [r for r in load_records() if str(r["job_id"]) in wanted]
        current = statuses(records, client)
        on_poll(current)
        if all(s.final for s in current):
            return current
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeoutError(timeout or 0.0, current)
        pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(pause)


# ----------------------------------------------------------------------------- pruning

_JOB_ID_RE = re.compile(r"^\d+$")
_TASK_ID_RE = re.compile(r"^\d+(?:_\d+)?$")
_LOG_NAME_RE = re.compile(r"^(?:build|install|kernel)-\d+(?:_\d+)?\.out$")


@dataclass(frozen=True)
class PrunedJob:
    """A finished job whose record we removed, and the files that went with it."""

    job_id: str
    kind: str
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
           if float(r.get("submitted_at", 0)) <= cutoff and _JOB_ID_RE.match(str(r.get("job_id", "")))]
    if not old:
        return []
    rows = statuses(old, slurm)
    running = {s.job_id for s in rows if not s.final}
    directory, logs = jobs_dir(), logs_dir()
    pruned: list[PrunedJob] = []
    for rec in old:
        job = str(rec["job_id"])
        if job in running:
            continue
        candidates = [directory / f"{job}.sbatch"]
        for task in rec["tasks"]:
            task_id = str(task.get("task_id", "")) if isinstance(task, dict) else ""
            if _TASK_ID_RE.match(task_id):
                candidates.append(directory / f"{task_id}.exit")
            log = Path(str(task.get("log", ""))) if isinstance(task, dict) else None
            if log is not None and log.parent == logs and _LOG_NAME_RE.match(log.name):
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
        pruned.append(PrunedJob(job, str(rec.get("kind", "build")),
                                tuple(str(k) for k in rec.get("kernels", [])), tuple(removed)))
    return pruned


def auto_prune(slurm: Slurm | None = None) -> None:
    """Best-effort :func:`prune` of jobs older than :data:`AUTO_PRUNE_DAYS` (never fails a submission)."""
    with contextlib.suppress(HpcKernelsError, OSError):
        prune(AUTO_PRUNE_DAYS, slurm=slurm)


def cancel_ours(job_ids: Iterable[str], slurm: Slurm | None = None) -> None:
    """``scancel`` jobs of ours (tests and Ctrl-C during --wait use this)."""
    (slurm or Slurm()).cancel(job_ids)
