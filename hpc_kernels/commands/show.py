"""``hpc-kernels show``: the kernel.json and the exact command its launcher will run."""

from __future__ import annotations

import argparse
from typing import Any

HELP = ("print a kernel's kernel.json, the exact command the launcher will run, and what its image holds "
        "(base and recipe digests, packages)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``show``."""
    parser.add_argument("name", metavar="NAME", help="kernel to show")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--recipe", action="store_true",
                        help="print the recipe a build of the kernel runs (generated for 'python:'/'base:' "
                             "kernels, derived from its 'def' otherwise); nothing is fetched")


#: The labels ``show`` prints, in this order, and how it names them.
SHOWN_LABELS = (
    ("org.hpc-kernels.build-id", "build id"),
    ("org.hpc-kernels.recipe", "recipe"),
    ("org.hpc-kernels.recipe-digest", "recipe digest"),
    ("org.hpc-kernels.base", "base"),
    ("org.hpc-kernels.base-digest", "base digest"),
    ("org.hpc-kernels.staged", "staged"),
    ("org.hpc-kernels.requirements", "requirements"),
    ("org.hpc-kernels.requirements-digest", "requirements digest"),
    ("org.hpc-kernels.lock", "lock"),
    ("org.hpc-kernels.inputs-digest", "inputs digest"),
    ("org.hpc-kernels.version", "hpc-kernels"),
)


def run(args: argparse.Namespace) -> int:
    """Show the installed kernel.json (or the one ``install`` would write) and the launch command."""
    import json
    import shlex

    from hpc_kernels import kernelspec, launch, registry, specdirs, ui
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.launchspec import read_kernel_json

    reg = registry.load(args.registry)
    entry = reg.get(args.name)
    if args.recipe:
        return _recipe(entry, args.json)
    installed = specdirs.installed_ours().get(entry.name)
    if installed:
        try:
            data, spec = read_kernel_json(str(installed / "kernel.json"))
        except ValueError as exc:  # launchspec.KernelSpecError: a damaged kernel.json, one sentence
            raise HpcKernelsError(str(exc)) from None
    else:
        dest = specdirs.Target().kernels_dir() / entry.name / "kernel.json"
        data = kernelspec.kernel_json(entry, dest, reg.path)
        spec = kernelspec.launch_spec(entry, reg.path)
    try:
        argv, _env, warnings = launch.plan(spec, "{connection_file}")
        command: str | None = shlex.join(argv)
        problem = None
    except HpcKernelsError as exc:
        command, warnings, problem = None, [], str(exc)
    job_script: str | None = None
    if spec.job is not None:  # a job kernel: the container command runs in its Slurm job, on the job's node
        from hpc_kernels.runtimes.job.script import sbatch_plan
        from hpc_kernels.runtimes.job.session import sessions_dir

        script, extra = sbatch_plan(spec, "<sid>", sessions_dir() / "<sid>.json")
        job_script = f"# submitted with: {shlex.join(['sbatch', '--parsable', *extra])}\n{script}"
    from hpc_kernels.build import provenance

    info = provenance.image_info(entry)
    if args.json:
        ui.print_json({"kernel": entry.name, "installed": str(installed) if installed else None,
                       "kernel_json": data, "command": argv if command else None, "problem": problem,
                       "warnings": warnings, "job_script": job_script, "image": info.to_json() if info else None})
        return 0
    out = ui.console()
    where = installed / "kernel.json" if installed else "not installed; would be written by install"
    out.print(f"[bold]kernel.json[/] ({ui.esc(where)}):")
    out.print(json.dumps(data, indent=1), markup=False)
    if job_script is not None:
        out.print("[bold]its Slurm job[/] (the launcher submits it, then relays to the kernel in it):")
        out.print(job_script.rstrip("\n"), markup=False)
        out.print("[bold]the job's agent runs[/] (on the job's node; GPU flags and binds are decided there):")
    else:
        out.print("[bold]launcher runs[/] (on this node, now):")
    out.print(command if command else f"(cannot resolve: {problem})", markup=False)
    for warning in warnings:
        out.print(f"[yellow]warning:[/] {ui.esc(warning)}")
    if info is not None:
        _print_image(out, info)
    return 0


def _print_image(out: Any, info: Any) -> None:
    """What the image says it holds, as label: value lines (text, never markup)."""
    import time

    from hpc_kernels import ui

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.built_at)) if info.built_at else "unknown"
    out.print(f"[bold]image[/] ({ui.esc(info.image)}, built {when}; from its {ui.esc(info.source)}):")
    if not info.labels:
        out.print("  no hpc-kernels labels (built by an earlier version: rebuild with --force to add them)",
                  markup=False)
        return
    rows = [(name, info.labels[key]) for key, name in SHOWN_LABELS if key in info.labels]
    width = max(len(name) for _key, name in SHOWN_LABELS)
    for name, value in rows:
        out.print(f"  {name + ':':<{width + 1}} {value}", markup=False)
    if info.packages is None:
        out.print(f"  {'packages:':<{width + 1}} not recorded (the recipe's %post ended before hpc-kernels' "
                  "last step)", markup=False)
    else:
        label = f"packages ({len(info.packages)}):"
        out.print(f"  {label:<{width + 1}} {' '.join(info.packages)}", markup=False)


def _recipe(entry: Any, as_json: bool) -> int:
    from hpc_kernels import ui
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.runtimes import table
    from hpc_kernels.staging import prepare

    if not entry.buildable or not table.get(entry.runtime).features.staged_builds:
        raise HpcKernelsError(f"kernel '{entry.name}' has no recipe hpc-kernels builds (its image is used as is, or "
                              "its runtime builds from the 'def' Dockerfile conversion).")
    text = prepare.preview(entry)
    if as_json:
        ui.print_json({"kernel": entry.name, "recipe": text})
    else:
        import sys

        sys.stdout.write(text)
    return 0
