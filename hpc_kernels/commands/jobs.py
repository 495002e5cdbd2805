"""``hpc-kernels jobs``: our Slurm build jobs and how they stand; also ``build --slurm``'s CLI side."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

from hpc_kernels import ui

if TYPE_CHECKING:
    from hpc_kernels.slurm import SubmittedJob, TaskStatus

HELP = ("show the Slurm jobs of 'build --slurm' and of job kernels, their state, and the log tail of failed "
        "ones")

#: ``build`` flags that only mean something with ``--slurm``.
SLURM_ONLY = ("account", "time", "mem", "cpus", "partition", "wait", "wait_timeout", "then_install", "dry_run")
#: ``jobs --prune`` forgets finished jobs submitted more than this many days ago (unless --older-than).
PRUNE_DAYS = 7.0

_COLOURS = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "COMPLETING": "cyan"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``jobs``."""
    parser.add_argument("--limit", type=int, default=20, metavar="N",
                        help="show the N most recent jobs (default 20; 0 = all)")
    parser.add_argument("--json", action="store_true", help="print the jobs as JSON")
    parser.add_argument("--prune", action="store_true",
                        help="forget finished jobs: remove their records, scripts, exit files and logs "
                             f"(those submitted more than {PRUNE_DAYS:g} days ago unless --older-than)")
    parser.add_argument("--older-than", type=float, metavar="DAYS",
                        help="with --prune: only jobs submitted more than DAYS days ago (0 = every finished job)")


def run(args: argparse.Namespace) -> int:
    """List our jobs (newest first) with their state; failed ones with the tail of their log."""
    from hpc_kernels import slurm
    from hpc_kernels.errors import UsageError

    if args.older_than is not None and not args.prune:
        raise UsageError("--older-than only applies with --prune.")
    if args.prune:
        return _prune(args)
    records = slurm.load_records()
    if args.limit > 0:
        records = records[: args.limit]
    rows = slurm.statuses(records) if records else []
    if args.json:
        ui.print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        ui.note(f"no Slurm jobs submitted by hpc-kernels (records live in {slurm.jobs_dir()}).")
        return 0
    _print_table(rows)
    for row in rows:
        if row.failed:
            _print_failure(row)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from hpc_kernels import slurm
    from hpc_kernels.errors import UsageError

    days = PRUNE_DAYS if args.older_than is None else args.older_than
    if days < 0:
        raise UsageError("--older-than must be a number of days >= 0.")
    pruned = slurm.prune(days)
    if args.json:
        ui.print_json([{"job_id": p.job_id, "kind": p.kind, "kernels": list(p.kernels),
                        "removed": [str(f) for f in p.files]} for p in pruned])
        return 0
    err = ui.console(stderr=True)
    for job in pruned:
        err.print(f"[green]✓[/] forgot {ui.esc(job.kind)} job {ui.esc(job.job_id)} ({ui.esc(', '.join(job.kernels))}): "
                  f"removed {len(job.files)} file(s)")
    if not pruned:
        err.print(f"nothing to prune: no finished job submitted more than {days:g} day(s) ago "
                  f"(records live in {slurm.jobs_dir()}).", markup=False)
    return 0


def _print_table(rows: list[TaskStatus]) -> None:
    """One row per task: ids, states and log paths whole (a log path is its own line in a narrow terminal)."""
    columns = (ui.Column("job"), ui.Column("kind"), ui.Column("kernel"), ui.Column("state"),
               ui.Column("submitted"), ui.Column("log", long=True))
    cells: list[list[ui.CellLike]] = []
    for row in rows:
        state = row.state + (f" ({row.reason})" if row.reason and row.state != "COMPLETED" else "")
        submitted = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.submitted_at)) \
            if row.submitted_at else ""
        cells.append([row.task_id, row.kind, row.kernel, ui.Cell(state, _COLOURS.get(row.state, "red")),
                      submitted or "—", ui.tilde(row.log) if row.log else "—"])
    ui.print_rows(columns, cells)


def _print_failure(row: TaskStatus, out: Any = None) -> None:
    out = out or ui.console()
    code = f", exit code {row.exit_code}" if row.exit_code not in ("", "0", "0:0") else ""
    esc = ui.esc
    head = f"[red]job {esc(row.task_id)}[/] ({esc(row.kind)} of {esc(row.kernel)}) ended {esc(row.state)}"
    if row.log_tail:
        out.print(f"{head}{esc(code)}; last lines of {esc(row.log)}:")
        out.print("\n".join("    " + line for line in row.log_tail.splitlines()), markup=False)
    else:
        why = f" ({row.reason})" if row.reason else ""
        out.print(f"{head}{esc(why)}{esc(code)}.")


# ----------------------------------------------------------------------------- build --slurm


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """``build``'s Slurm flags (defaults fit DRAC; sbatch also reads SBATCH_ACCOUNT etc. itself)."""
    # Not from hpc_kernels.slurm: this runs at every CLI start (the parser is built first), slurm costs ~20 ms.
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


def run_build(args: argparse.Namespace) -> int:
    """``build --slurm``: submit the build job (array), optionally the install job; print ids and logs."""
    from hpc_kernels import registry, slurm
    from hpc_kernels.build import stamps
    from hpc_kernels.errors import UsageError

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
    from hpc_kernels.build import recipe

    for entry in entries:  # a recipe the job would refuse is refused before anything is staged or printed
        if entry.recipe is not None:
            recipe.check(entry.recipe)
    staged: set[str] = set()
    if getattr(args, "lock", False) or getattr(args, "pull", False):
        # Locks are written before anything else: they are inputs of the build (its digest covers them).
        _stage_for_jobs([e for e in entries if e.runtime == "apptainer"], args, staged)
    to_build = entries if args.force or args.dry_run else [
        e for e in entries if stamps.image_state(e).status != "built"
    ]
    for entry in entries:
        if entry not in to_build:
            err.print(f"[green]✓[/] {ui.esc(entry.name)}: up to date ({ui.esc(entry.image)}); no build job needed")
    # A missing %files source would fail the job after its wait in the queue: say so now.
    missing = [m for e in to_build if e.recipe is not None for m in stamps.missing_inputs(e.recipe)]
    if missing:
        from hpc_kernels.errors import HpcKernelsError

        detail = missing[0] if len(missing) == 1 else \
            "recipes copy files that do not exist:\n" + "\n".join(f"  {m}" for m in missing)
        raise HpcKernelsError(f"no job submitted: {detail}")
    install = [e.name for e in entries] if args.then_install else []
    # Resources: flag > kernel's slurm: > defaults: slurm: > built-in (an install-only job: the selection's).
    options = slurm.job_options(to_build or entries, flags)
    # Staging, here on the login node: the job then builds without network (compute nodes have none).
    from hpc_kernels.staging_settings import Staging

    _stage_for_jobs([e for e in to_build if e.runtime == "apptainer" and e.staging is not Staging.NEVER
                     and e.name not in staged], args, staged)
    if any(e.name in staged for e in to_build):
        build_args.append("--offline")
    if args.dry_run:
        _print_recipes(to_build, staged)
        _print_scripts(to_build, install, reg.path, options, build_args)
        return 0
    submitted = slurm.submit_builds(to_build, reg.path, options, build_args=build_args, install=install)
    for job in submitted:
        _announce(job, err)
    if not (args.wait or args.wait_timeout is not None):
        if args.json:
            ui.print_json([_job_json(j) for j in submitted])
        return 0
    timeout = args.wait_timeout if args.wait_timeout is not None else \
        slurm.default_wait_timeout(options, submitted)
    return _wait(submitted, args.json, timeout)


def _stage_for_jobs(entries: list[Any], args: argparse.Namespace, staged: set[str]) -> None:
    """Stage each of ``entries`` (and write its lock with --lock); a failure submits nothing."""
    from hpc_kernels.commands.build import stage_and_report
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.staging_settings import Staging

    for entry in entries:
        try:
            # On stderr, also with --json: it says why the command is not done yet.
            stage_and_report(entry, pull=bool(getattr(args, "pull", False)), lock=bool(getattr(args, "lock", False)))
        except HpcKernelsError as exc:
            raise HpcKernelsError(f"no job submitted: {exc}") from None
        if entry.staging is not Staging.NEVER:  # a kernel with 'staging: never' still builds as its recipe says
            staged.add(entry.name)


def _print_recipes(to_build: list[Any], staged: set[str]) -> None:
    """``--dry-run``: the recipe each job task builds, derived from the kernel's (never written over)."""
    from hpc_kernels.staging import prepare

    for entry in to_build:
        if entry.runtime != "apptainer":
            continue
        how = "from the inputs staged on this node, without network" if entry.name in staged else \
            "as its recipe says (staging: never): the job fetches what it needs"
        text = prepare.preview(entry, staged_inputs=entry.name in staged)
        sys.stdout.write(f"# the recipe the job builds for kernel '{entry.name}', {how}:\n{text}\n")


def _flags(args: argparse.Namespace) -> Any:
    # The very rules of the registry's slurm: block: a flag's value ends up in the same batch script.
    from hpc_kernels.slurm_settings import from_flags

    return from_flags(account=args.account, time=args.time, mem=args.mem, cpus=args.cpus,
                      partition=args.partition)


def _print_scripts(to_build: list[Any], install: list[str], registry: Any, options: Any,
                   build_args: list[str]) -> None:
    from hpc_kernels import slurm

    if to_build:
        plan = slurm.plan_build(to_build, registry, options, build_args=build_args)
        sys.stdout.write(f"# submit with: {_sbatch_line(plan.sbatch_args)}\n{plan.script}")
    if install:
        plan = slurm.plan_install(install, registry, options)
        dep = slurm.dependency_args("<build job id>") if to_build else []
        sys.stdout.write(f"\n# then: {_sbatch_line([*dep, *plan.sbatch_args])}\n{plan.script}")


def _sbatch_line(args: Any) -> str:
    import shlex

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
    from hpc_kernels import slurm
    from hpc_kernels.errors import HpcKernelsError

    err = ui.console(stderr=True)
    ids = [j.job_id for j in submitted]
    seen: dict[str, str] = {}

    def on_poll(rows: list[TaskStatus]) -> None:
        for row in rows:
            if seen.get(row.task_id) != row.state:
                seen[row.task_id] = row.state
                err.print(f"  job {row.task_id} ({row.kernel}): {row.state}", markup=False)

    try:
        rows = slurm.wait(ids, timeout=timeout, on_poll=on_poll)
    except slurm.WaitTimeoutError as exc:
        if as_json:
            ui.print_json([r.to_json() for r in exc.rows])
        raise
    except KeyboardInterrupt:
        err.print(f"stopped waiting; the job(s) {', '.join(ids)} keep going: see 'hpc-kernels jobs'.", markup=False)
        raise
    if as_json:
        ui.print_json([r.to_json() for r in rows])
    # The build's failure explains a cancelled install job: report builds first.
    failed = sorted((r for r in rows if r.failed), key=lambda r: r.kind != "build")
    for row in failed:
        if not as_json:
            _print_failure(row, err)
    if failed:
        first = failed[0]
        raise HpcKernelsError(
            f"{len(failed)} of {len(rows)} job(s) did not succeed (job {first.task_id}, "
            f"{first.kind} of {first.kernel}: {first.state}); see 'hpc-kernels jobs'."
        )
    return 0
