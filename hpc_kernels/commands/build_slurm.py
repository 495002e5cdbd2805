"""``hpc-kernels build --slurm``: the CLI half of building in Slurm jobs (flags, staging on this node,
submitting, ``--wait``, ``--dry-run``). :mod:`hpc_kernels.commands.build` hands over to :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import ui
from hpc_kernels.commands.jobs import print_failure
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, UsageError
from hpc_kernels.model import JobKind, KernelEntry, Runtime, SlurmFlags, Staging

if TYPE_CHECKING:
    from hpc_kernels.slurm import JobOptions
    from hpc_kernels.slurm_records import TaskStatus
    from hpc_kernels.slurm_submit import SubmittedJob

#: ``build`` flags that only mean something with ``--slurm``.
SLURM_ONLY = ("account", "time", "mem", "cpus", "partition", "wait", "wait_timeout", "then_install", "dry_run")
#: How ``build`` stages one kernel on this node and says so (``commands.build.stage_and_report``).
Stager = Callable[..., None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``build``'s Slurm flags (defaults fit DRAC; sbatch also reads SBATCH_ACCOUNT etc. itself)."""
    # why: not from hpc_kernels.slurm: this runs at every CLI start (the parser is built first), slurm costs ~20 ms.
    from hpc_kernels.slurm_settings import DEFAULT_CPUS, DEFAULT_MEM, DEFAULT_TIME

    group = parser.add_argument_group(
        "building in a Slurm job (DRAC: never build on a login node)",
        "A flag beats the registry's 'slurm:' settings (kernel, then defaults), which beat the "
        "built-in defaults shown here.")
    group.add_argument("--slurm", action="store_true",
                       help="build in a Slurm batch job (several kernels: one job array) instead of here")
    group.add_argument("--account", metavar="A", help="Slurm account, e.g. def-pi (default: $SBATCH_ACCOUNT)")
    group.add_argument("--time", metavar="T", help=f"time limit (default {DEFAULT_TIME})")
    group.add_argument("--mem", metavar="M", help=f"memory (default {DEFAULT_MEM})")
    group.add_argument("--cpus", metavar="N", type=int, help=f"CPUs per task (default {DEFAULT_CPUS})")
    group.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    group.add_argument("--wait", action="store_true", help="wait for the job(s) to end; exit 1 if one failed")
    group.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                       help="with --wait (implied): give up after SECONDS, exit 1 and name the jobs still "
                            "going (they keep running); default: the jobs' time limits + 10 min")
    group.add_argument("--then-install", action="store_true",
                       help="install the kernelspecs in a job that runs after a successful build (afterok)")
    group.add_argument("--dry-run", action="store_true", help="print the batch script(s); submit nothing")


def slurm_requested(args: argparse.Namespace) -> bool:
    """True when ``build`` was given --slurm or any flag that only makes sense with it."""
    return bool(getattr(args, "slurm", False)) or any(
        getattr(args, name, None) not in (None, False) for name in SLURM_ONLY
    )


def run(args: argparse.Namespace, stage: Stager) -> int:
    """``build --slurm``: submit the build job (array), optionally the install job; print ids and logs.
    ``stage(entry, pull=, lock=)`` stages one kernel on this node (``build``'s own, with its messages)."""
    # why: the CLI imports command modules at start; the registry (YAML), builds and Slurm load only here.
    from hpc_kernels import registry, slurm, slurm_submit
    from hpc_kernels.build import recipe, stamps

    if not args.slurm:
        given = [f"--{n.replace('_', '-')}" for n in SLURM_ONLY
                 if getattr(args, n, None) not in (None, False)]
        verb = "only applies" if len(given) == 1 else "only apply"
        raise UsageError(f"{', '.join(given)} {verb} with --slurm (build in a Slurm job).")
    if args.cpus is not None and args.cpus < 1:
        raise UsageError("--cpus must be at least 1.")
    if args.wait_timeout is not None and args.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be a number of seconds > 0.")
    if getattr(args, "offline", False):
        raise UsageError("--offline is for a build here: a --slurm job builds from the inputs staged on this node "
                         "by itself (the registry's 'staging:', default 'auto').")
    flags = _flags(args)
    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    # Flags of the local build travel into the job's `hpc-kernels build` (--fakeroot, --no-check where they exist).
    fakeroot = bool(getattr(args, "fakeroot", False))
    if fakeroot:
        entries = [dataclasses.replace(e, fakeroot=True) for e in entries]
    build_args = ((["--force"] if args.force else []) + (["--fakeroot"] if fakeroot else [])
                  + (["--no-check"] if getattr(args, "no_check", False) else []))
    err = ui.console(stderr=True)
    unbuildable = [e.name for e in entries if not e.buildable]
    if unbuildable:
        raise UsageError(f"nothing to build for {', '.join(unbuildable)}: no 'def' recipe in {reg.path}.")
    for entry in entries:  # a recipe the job would refuse is refused before anything is staged or printed
        if entry.recipe is not None:
            recipe.check(entry.recipe)
    staged: set[str] = set()
    if getattr(args, "lock", False) or getattr(args, "pull", False):
        # Locks are written before anything else: they are inputs of the build (its digest covers them).
        _stage_for_jobs([e for e in entries if e.runtime == Runtime.APPTAINER], args, staged, stage)
    to_build = entries if args.force or args.dry_run else [
        e for e in entries if stamps.image_state(e).status != "built"
    ]
    for entry in entries:
        if entry not in to_build:
            err.print(f"[green]✓[/] {ui.esc(entry.name)}: up to date ({ui.esc(entry.image)}); no build job needed")
    # A missing %files source would fail the job after its wait in the queue: say so now.
    missing = [m for e in to_build if e.recipe is not None for m in stamps.missing_inputs(e.recipe)]
    if missing:
        detail = missing[0] if len(missing) == 1 else \
            "recipes copy files that do not exist:\n" + "\n".join(f"  {m}" for m in missing)
        raise HpcKernelsError(f"no job submitted: {detail}")
    install = [e.name for e in entries] if args.then_install else []
    # Resources: flag > kernel's slurm: > defaults: slurm: > built-in (an install-only job: the selection's).
    options = slurm.job_options(to_build or entries, flags)
    # Staging, here on the login node: the job then builds without network (compute nodes have none).
    _stage_for_jobs([e for e in to_build if e.runtime == Runtime.APPTAINER and e.staging is not Staging.NEVER
                     and e.name not in staged], args, staged, stage)
    if any(e.name in staged for e in to_build):
        build_args.append("--offline")
    if args.dry_run:
        _print_recipes(to_build, staged)
        _print_scripts(to_build, install, reg.path, options, build_args)
        return 0
    submitted = slurm_submit.submit_builds(to_build, reg.path, options, apptainer_dir=submit_time_apptainer_dir(),
                                           build_args=build_args, install=install)
    for job in submitted:
        _announce(job, err)
    if not (args.wait or args.wait_timeout is not None):
        if args.json:
            ui.print_json([_job_json(j) for j in submitted])
        return 0
    timeout = args.wait_timeout if args.wait_timeout is not None else \
        slurm_submit.default_wait_timeout(options, submitted)
    return _wait(submitted, args.json, timeout)


def submit_time_apptainer_dir() -> str:
    """The directory of the Apptainer found now (a PATH fallback for the job), or ""."""
    # why: the Apptainer adapter (and what it imports) loads only when a job is planned.
    from hpc_kernels.runtimes.apptainer.cli import find_binary

    try:
        return str(Path(find_binary()).parent)
    except RuntimeNotFoundError:
        return ""


def _stage_for_jobs(entries: list[KernelEntry], args: argparse.Namespace, staged: set[str], stage: Stager) -> None:
    """Stage each of ``entries`` (and write its lock with --lock); a failure submits nothing."""
    for entry in entries:
        try:
            # On stderr, also with --json: it says why the command is not done yet.
            stage(entry, pull=bool(getattr(args, "pull", False)), lock=bool(getattr(args, "lock", False)))
        except HpcKernelsError as exc:
            raise HpcKernelsError(f"no job submitted: {exc}") from None
        if entry.staging is not Staging.NEVER:  # a kernel with 'staging: never' still builds as its recipe says
            staged.add(entry.name)


def _print_recipes(to_build: list[KernelEntry], staged: set[str]) -> None:
    """``--dry-run``: the recipe each job task builds, derived from the kernel's (never written over)."""
    from hpc_kernels.staging import prepare  # why: staging (~1100 lines) loads only for a dry run

    for entry in to_build:
        if entry.runtime != Runtime.APPTAINER:
            continue
        how = "from the inputs staged on this node, without network" if entry.name in staged else \
            "as its recipe says (staging: never): the job fetches what it needs"
        text = prepare.preview(entry, staged_inputs=entry.name in staged)
        sys.stdout.write(f"# the recipe the job builds for kernel '{entry.name}', {how}:\n{text}\n")


def _flags(args: argparse.Namespace) -> SlurmFlags:
    # The very rules of the registry's slurm: block: a flag's value ends up in the same batch script.
    from hpc_kernels.keys import slurm_from_flags  # why: as in run()

    return slurm_from_flags(account=args.account, time=args.time, mem=args.mem, cpus=args.cpus,
                      partition=args.partition)


def _print_scripts(to_build: list[KernelEntry], install: list[str], registry: Path, options: JobOptions,
                   build_args: list[str]) -> None:
    from hpc_kernels import slurm  # why: as in run()

    if to_build:
        plan = slurm.plan_build(to_build, registry, options, apptainer_dir=submit_time_apptainer_dir(),
                                build_args=build_args)
        sys.stdout.write(f"# submit with: {_sbatch_line(plan.sbatch_args)}\n{plan.script}")
    if install:
        plan = slurm.plan_install(install, registry, options)
        dep = slurm.dependency_args("<build job id>") if to_build else []
        sys.stdout.write(f"\n# then: {_sbatch_line([*dep, *plan.sbatch_args])}\n{plan.script}")


def _sbatch_line(args: Any) -> str:
    return " ".join(["sbatch", "--parsable", *(shlex.quote(a) for a in args), "<this script>"])


def _announce(job: SubmittedJob, err: Any) -> None:
    what = ", ".join(job.kernels)
    after = f" (runs after job {job.depends_on} succeeds)" if job.depends_on else ""
    kind = "build job array" if len(job.tasks) > 1 else f"{job.kind} job"
    err.print(f"[green]✓[/] submitted {kind} [bold]{ui.esc(job.job_id)}[/] for {ui.esc(what)}{after}")
    for task in job.tasks:
        label = f"  {task.task_id} ({task.kernel})" if len(job.tasks) > 1 else " "
        err.print(f"{label} log: {task.log}", markup=False)


def _job_json(job: SubmittedJob) -> dict[str, Any]:
    return {"job_id": job.job_id, "kind": job.kind, "kernels": list(job.kernels),
            "depends_on": job.depends_on, "record": str(job.record),
            "tasks": [{"task_id": t.task_id, "kernel": t.kernel, "log": str(t.log)} for t in job.tasks]}


def _wait(submitted: list[SubmittedJob], as_json: bool, timeout: float) -> int:
    from hpc_kernels import slurm_records  # why: as in run()

    err = ui.console(stderr=True)
    ids = [j.job_id for j in submitted]
    seen: dict[str, str] = {}

    def on_poll(rows: list[TaskStatus]) -> None:
        for row in rows:
            if seen.get(row.task_id) != row.state:
                seen[row.task_id] = row.state
                err.print(f"  job {row.task_id} ({row.kernel}): {row.state}", markup=False)

    try:
        rows = slurm_records.wait(ids, timeout=timeout, on_poll=on_poll)
    except slurm_records.WaitTimeoutError as exc:
        if as_json:
            ui.print_json([r.to_json() for r in exc.rows])
        raise
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the job(s) {', '.join(ids)} keep going: see 'hpc-kernels jobs'.", markup=False)
        raise
    if as_json:
        ui.print_json([r.to_json() for r in rows])
    # The build's failure explains a cancelled install job: report builds first.
    failed = sorted((r for r in rows if r.failed), key=lambda r: r.kind != JobKind.BUILD)
    for row in failed:
        if not as_json:
            print_failure(row, err)
    if failed:
        first = failed[0]
        raise HpcKernelsError(
            f"{len(failed)} of {len(rows)} job(s) did not succeed (job {first.task_id}, "
            f"{first.kind} of {first.kernel}: {first.state}); see 'hpc-kernels jobs'."
        )
    return 0
