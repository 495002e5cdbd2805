"""``hpc-kernels build``: build images from their recipes, only when their inputs changed."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import TYPE_CHECKING

from hpc_kernels import ui
from hpc_kernels.commands import build_slurm
from hpc_kernels.errors import BuildError, HpcKernelsError, UsageError
from hpc_kernels.model import Fetch, Runtime, Staging

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from hpc_kernels.build.orchestrator import BuildResult
    from hpc_kernels.model import Fetch, KernelEntry

HELP = "build kernel images from their .def recipes (only when the inputs changed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``build``."""
    ui.add_selection(parser, "build")
    parser.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail instead of waiting when another process is building the same image")
    parser.add_argument("--fakeroot", action="store_true",
                        help="build with --fakeroot (for recipes that need root; no sudo is ever used)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not check that the new image can start its kernel (for an image that needs what "
                             "this node lacks: a GPU, a bind source, another CPU architecture)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    group = parser.add_argument_group(
        "staging (compute nodes without internet)",
        "The registry's 'staging:' (auto, always, never) says when hpc-kernels fetches a build's base image and "
        "Python packages on this node first, so the build needs no network: 'auto' stages for --slurm.")
    group.add_argument("--offline", action="store_true",
                       help="build from the inputs staged before, never from the network (what a --slurm job "
                            "runs); kernels with 'staging: never' build as their recipe says")
    group.add_argument("--lock", action="store_true",
                       help="resolve the Python packages anew, stage them, and write the versions (and the base's "
                            "digest) to <registry>.locks/NAME.txt beside the registry: later builds install "
                            "exactly those")
    group.add_argument("--pull", action="store_true",
                       help="look up the base images' tags again (staging reuses the digest it found first)")
    build_slurm.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build each selected kernel; keep going after a failure and report all of them."""
    # why: builds and the registry (YAML) load only when `build` runs.
    from hpc_kernels import registry
    from hpc_kernels.build import orchestrator, stamps

    if build_slurm.slurm_requested(args):
        return build_slurm.run(args, stage=stage_and_report)
    _check_staging_flags(args)

    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    if args.fakeroot:
        entries = [dataclasses.replace(e, fakeroot=True) for e in entries]
    err = ui.console(stderr=True)
    results: list[dict[str, object]] = []
    failures: list[str] = []
    for entry in entries:
        try:
            fetch = stage_first(entry, args)
        except HpcKernelsError as exc:  # nothing was built or written: one sentence
            failures.append(str(exc))
            results.append({"kernel": entry.name, "action": "failed", "error": str(exc)})
            continue
        if not args.force and entry.buildable and not (args.lock or args.pull):
            # The no-op path, answered without a live progress display (a thread per kernel) or rich.progress.
            t0 = time.monotonic()
            if stamps.image_state(entry).status == "built":
                _record(orchestrator.BuildResult(entry.name, "up-to-date", entry.image, None, time.monotonic() - t0),
                        results, args.json)
                continue
        # Not a terminal (a log, a pipe): no live display (it would leave a blank line behind), but every
        # event (waiting for another build) as a line of its own.
        live = err.is_terminal and not args.json
        with _progress(err, entry.name, enabled=live) as progress:
            task = progress.add_task("checking inputs", kernel=entry.name)

            def on_line(line: str, task: object = task) -> None:
                progress.update(task, description=line.strip()[-80:])  # type: ignore[arg-type]

            def on_event(msg: str, task: object = task, live: bool = live, name: str = entry.name) -> None:
                progress.update(task, description=msg)  # type: ignore[arg-type]
                if not live:  # also with --json: stderr says why the command is not done yet
                    ui.say(f"{name}: {msg}", "…")

            try:
                result = orchestrator.build(entry, force=args.force, wait=not args.no_wait,
                                     on_line=on_line, on_event=on_event, fetch=fetch, check=not args.no_check)
            except BuildError as exc:
                failures.append(str(exc))
                results.append({"kernel": entry.name, "action": "failed", "error": str(exc),
                                "log": exc.log_path})
                continue
            except HpcKernelsError as exc:
                failures.append(str(exc))
                results.append({"kernel": entry.name, "action": "failed", "error": str(exc)})
                continue
        _record(result, results, args.json)
        if result.action == "built" and not args.json:
            _note_outdated_kernelspec(entry)
    if args.json:
        ui.print_json(results)
    if failures:
        if len(failures) == 1:
            raise HpcKernelsError(failures[0])
        raise HpcKernelsError(f"{len(failures)} of {len(entries)} builds failed:\n" + "\n".join(failures))
    return 0


def _check_staging_flags(args: argparse.Namespace) -> None:
    if args.offline and (args.lock or args.pull):
        raise UsageError("--offline builds from what was staged; --lock and --pull stage anew: give one or the other.")


def stage_first(entry: KernelEntry, args: argparse.Namespace, *, quiet: bool = False) -> Fetch | None:
    """Stage ``entry``'s inputs on this node when the build should not fetch them itself (``staging: always``,
    ``--lock``, ``--pull``) and write its lock with ``--lock``; the :class:`~hpc_kernels.model.Fetch` its
    build then uses (None: the registry's default)."""
    if entry.runtime != Runtime.APPTAINER or not entry.buildable:
        return None
    if args.offline:
        return Fetch.STAGED if entry.staging is not Staging.NEVER else Fetch.NETWORK
    if not (args.lock or args.pull or entry.staging is Staging.ALWAYS):
        return None
    if entry.staging is Staging.ALWAYS and not (args.lock or args.pull or args.force):
        from hpc_kernels.build import stamps  # why: as in run()

        if stamps.image_state(entry).status == "built":
            return Fetch.STAGED  # up to date: nothing to stage (the build is a no-op)
    stage_and_report(entry, pull=args.pull, lock=args.lock, quiet=quiet)
    return Fetch.STAGED


def stage_and_report(entry: KernelEntry, *, pull: bool, lock: bool, quiet: bool = False) -> None:
    """Stage ``entry`` (and write its lock with ``lock``), saying on stderr what was fetched."""
    from hpc_kernels.staging import inputs, wheelhouse  # why: staging (~1100 lines) loads only when a kernel is staged

    name = entry.name

    def event(msg: str) -> None:
        if not quiet:
            ui.say(f"{name}: {msg}", "…")

    result = inputs.stage(entry, pull=pull, fresh_lock=lock, on_event=event)
    parts = [f"base {b.shown}@{b.digest[:19]}" for b in result.bases]
    if result.wheelhouse is not None and result.probe is not None:
        parts.append(f"{len(result.wheelhouse.wheels)} wheel(s) for Python {result.probe.python}")
    how = f"fetched {', '.join(result.fetched)}" if result.fetched else "all from the cache"
    if parts and not quiet:  # nothing to stage (a local base, no packages): nothing to say
        ui.say(f"{name}: staged {', '.join(parts)} ({how}, {result.seconds:.1f} s)", "✓", "green")
    if lock:
        path = wheelhouse.write_lock(entry, result)
        if not quiet:
            ui.say(f"{name}: wrote the lock {ui.tilde(path)}", "✓", "green")


def _note_outdated_kernelspec(entry: KernelEntry) -> None:
    """After a build: when the kernelspec Jupyter uses runs another command than the new image needs (the
    build found only 'python' where the kernelspec says 'python3'), say that it must be installed again."""
    # why: kernelspec loads only after a build.
    from hpc_kernels import kernelspec, specdirs
    from hpc_kernels.launchspec import read_kernel_json

    kdir = specdirs.visible(entry.name)
    if kdir is None or not specdirs.is_ours(kdir):
        return
    try:
        _data, installed = read_kernel_json(str(kdir / "kernel.json"))
    except (OSError, ValueError):
        return
    wanted = kernelspec.launch_spec(entry).command
    if installed.command != wanted:
        update = specdirs.command("install", entry.name, kdir) or f"hpc-kernels install {entry.name}"
        ui.say(f"the installed kernelspec ({ui.tilde(kdir)}) runs '{installed.command[0]}', the new image needs "
               f"'{wanted[0]}': run '{update}'.", "note:", "yellow", indent="  ")


def _progress(err: Console, kernel: str, enabled: bool) -> Progress:
    """The one-line live display of a build: the kernel's name whole, the builder's last line cut to fit."""
    # why: rich.progress costs ~20 ms to import; only a build on a terminal shows progress.
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    # Fixed widths for the spinner, the name and the clock; the builder's line takes what is left (a
    # table too wide for the terminal would otherwise squeeze every column, the name to 'sc…').
    return Progress(
        SpinnerColumn(table_column=Column(no_wrap=True, width=1)),
        TextColumn("{task.fields[kernel]}", style="bold", markup=False,
                   table_column=Column(no_wrap=True, width=len(kernel))),
        TextColumn("{task.description}", markup=False,
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        TimeElapsedColumn(table_column=Column(no_wrap=True, width=7)),
        console=err, transient=True, expand=True, disable=not enabled)


def _record(result: BuildResult, results: list[dict[str, object]], as_json: bool) -> None:
    """Add one kernel's outcome to the JSON results, or say it on stderr."""
    results.append({"kernel": result.kernel, "action": result.action, "image": str(result.image),
                    "log": str(result.log_path) if result.log_path else None,
                    "seconds": round(result.seconds, 3)})
    if not as_json:
        if result.action == "up-to-date":
            ui.say(f"{result.kernel}: up to date ({ui.tilde(result.image)})", "✓", "green")
        else:
            ui.say(f"{result.kernel}: built {ui.tilde(result.image)} in {result.seconds:.1f} s "
                   f"(log: {ui.tilde(result.log_path) if result.log_path else '—'})", "✓", "green")
