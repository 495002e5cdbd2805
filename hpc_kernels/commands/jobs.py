"""``hpc-kernels jobs``: our Slurm jobs (``build --slurm``'s, job kernels') and how they stand."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from hpc_kernels import ui
from hpc_kernels.errors import UsageError

if TYPE_CHECKING:
    from hpc_kernels.slurm_records import TaskStatus

HELP = ("show the Slurm jobs of 'build --slurm' and of job kernels, their state, and the log tail of failed "
        "ones")

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
    # why: the CLI imports every command module at start; Slurm's modules load only when `jobs` runs.
    from hpc_kernels import slurm, slurm_records

    if args.older_than is not None and not args.prune:
        raise UsageError("--older-than only applies with --prune.")
    if args.prune:
        return _prune(args)
    records = slurm_records.load_records()
    if args.limit > 0:
        records = records[: args.limit]
    rows = slurm_records.statuses(records) if records else []
    if args.json:
        ui.print_json([r.to_json() for r in rows])
        return 0
    if not rows:
        ui.note(f"no Slurm jobs submitted by hpc-kernels (records live in {slurm.jobs_dir()}).")
        return 0
    _print_table(rows)
    for row in rows:
        if row.failed:
            print_failure(row)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from hpc_kernels import slurm, slurm_submit  # why: as in run()

    days = PRUNE_DAYS if args.older_than is None else args.older_than
    if days < 0:
        raise UsageError("--older-than must be a number of days >= 0.")
    pruned = slurm_submit.prune(days)
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


def print_failure(row: TaskStatus, out: Any = None) -> None:
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
