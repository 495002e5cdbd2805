"""Prebuild images in Slurm jobs: each job's resources (:class:`JobOptions`: a flag > the kernel's ``slurm:``
> ``defaults: slurm:`` > the built-in DRAC defaults), its batch script from a template (a job array for
several kernels, an install job after them), and where our job files live.

Inside the job runs the very same ``hpc-kernels build NAME --registry <abs path>`` (through the
absolute path of this interpreter), so the incremental/atomic/locked rules of :mod:`hpc_kernels.build`
hold there too, and the image lands in its registry location. The job script records its exit
code in ``<state dir>/jobs/<job>[_<task>].exit``. Submitting and remembering jobs:
:mod:`hpc_kernels.slurm_submit`; how they stand: :mod:`hpc_kernels.slurm_records`.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpc_kernels import __version__, paths, templates
from hpc_kernels.build import recipe
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import JOB_RECORD_FORMAT, NO_FLAGS, JobKind, KernelEntry, SlurmFlags
from hpc_kernels.slurm_settings import (
    DEFAULT_CPUS,
    DEFAULT_MEM,
    DEFAULT_TIME,
    mem_megabytes,
    time_minutes,
)

#: Loaded in the job when Lmod has them (the registry's ``slurm: modules`` replaces the list).
DEFAULT_MODULES = ("apptainer",)
#: The install job only writes a kernel.json.
INSTALL_TIME = "0:10:00"
INSTALL_MEM = "1G"
#: The format of our job records (job kernels write theirs with it too: hpc_kernels.runtimes.job).
RECORD_FORMAT = JOB_RECORD_FORMAT


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


def job_options(entries: Sequence[KernelEntry], flags: SlurmFlags = NO_FLAGS) -> JobOptions:
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

    kind: JobKind
    kernels: tuple[str, ...]
    script: str
    sbatch_args: tuple[str, ...]
    output: str  # sbatch --output pattern (%j, or %A_%a for arrays)
    options: JobOptions = JobOptions()

    @property
    def array(self) -> bool:
        """One task per kernel."""
        return self.kind == JobKind.BUILD and len(self.kernels) > 1


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


def plan_build(entries: Sequence[KernelEntry], registry: Path, options: JobOptions, *,
               apptainer_dir: str, build_args: Sequence[str] = (), python: str = sys.executable) -> PlannedJob:
    """The batch script that builds ``entries`` (one array task per kernel when there are several).

    ``build_args`` are extra flags of the ``hpc-kernels build`` run in the job (``--force``...);
    ``apptainer_dir`` is the job's PATH fallback for Apptainer (where it was found at submission, or "").
    """
    if not entries:
        raise HpcKernelsError("no kernel to build in a job.")
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
        apptainer_dir=shlex.quote(apptainer_dir),
        command=command,
        jobs_dir=shlex.quote(str(jobs_dir())),
    )
    return PlannedJob(JobKind.BUILD, names, script, tuple(options.sbatch_args()), output, options)


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
    return PlannedJob(JobKind.INSTALL, tuple(names), script, tuple(opts.sbatch_args()), output, opts)


def dependency_args(build_job: str) -> list[str]:
    """``afterok`` on the whole build job (every array task); cancelled, not stuck, when it fails."""
    return [f"--dependency=afterok:{build_job}", "--kill-on-invalid-dep=yes"]


