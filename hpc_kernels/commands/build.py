"""``hpc-kernels build``: build images from their recipes, only when their inputs changed."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import TYPE_CHECKING

from hpc_kernels import ui

if TYPE_CHECKING:
    from rich.console import Console

    from hpc_kernels.build import BuildResult

HELP = "build kernel images from their .def recipes (only when the inputs changed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``build``."""
    ui.add_selection(parser, "build")
    parser.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail instead of waiting when another process is building the same image")
    parser.add_argument("--fakeroot", action="store_true",
                        help="build with --fakeroot (for recipes that need root; no sudo is ever used)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    from hpc_kernels.commands import jobs

    jobs.add_build_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build each selected kernel; keep going after a failure and report all of them."""
    from hpc_kernels import build, registry
    from hpc_kernels.commands import jobs
    from hpc_kernels.errors import BuildError, HpcKernelsError

    if jobs.slurm_requested(args):
        return jobs.run_build(args)

    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    if args.fakeroot:
        entries = [dataclasses.replace(e, fakeroot=True) for e in entries]
    err = ui.console(stderr=True)
    results: list[dict[str, object]] = []
    failures: list[str] = []
    for entry in entries:
        if not args.force and entry.recipe is not None:
            # The no-op path, answered without a live progress display (a thread per kernel) or rich.progress.
            t0 = time.monotonic()
            if build.image_state(entry).status == "built":
                _record(build.BuildResult(entry.name, "up-to-date", entry.image, None, time.monotonic() - t0),
                        results, err, args.json)
                continue
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        # Build output lines become the description: shown as text, never as markup.
        with Progress(SpinnerColumn(), TextColumn("{task.fields[kernel]}", style="bold", markup=False),
                      TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                      console=err, transient=True, disable=args.json) as progress:
            task = progress.add_task("checking inputs", kernel=entry.name)

            def on_line(line: str, task: object = task) -> None:
                progress.update(task, description=line.strip()[-80:])  # type: ignore[arg-type]

            def on_event(msg: str, task: object = task) -> None:
                progress.update(task, description=msg)  # type: ignore[arg-type]

            try:
                result = build.build(entry, force=args.force, wait=not args.no_wait,
                                     on_line=on_line, on_event=on_event)
            except BuildError as exc:
                failures.append(str(exc))
                results.append({"kernel": entry.name, "action": "failed", "error": str(exc),
                                "log": exc.log_path})
                continue
            except HpcKernelsError as exc:
                failures.append(str(exc))
                results.append({"kernel": entry.name, "action": "failed", "error": str(exc)})
                continue
        _record(result, results, err, args.json)
    if args.json:
        ui.print_json(results)
    if failures:
        if len(failures) == 1:
            raise HpcKernelsError(failures[0])
        raise HpcKernelsError(f"{len(failures)} of {len(entries)} builds failed:\n" + "\n".join(failures))
    return 0


def _record(result: BuildResult, results: list[dict[str, object]], err: Console, as_json: bool) -> None:
    """Add one kernel's outcome to the JSON results, or say it on stderr."""
    results.append({"kernel": result.kernel, "action": result.action, "image": str(result.image),
                    "log": str(result.log_path) if result.log_path else None,
                    "seconds": round(result.seconds, 3)})
    if not as_json:
        kernel, image = ui.esc(result.kernel), ui.esc(result.image)
        if result.action == "up-to-date":
            err.print(f"[green]✓[/] {kernel}: up to date ({image})")
        else:
            err.print(f"[green]✓[/] {kernel}: built {image} in {result.seconds:.1f} s "
                      f"(log: {ui.esc(result.log_path)})")
