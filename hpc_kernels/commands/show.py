"""``hpc-kernels show``: the kernel.json and the exact command its launcher will run."""

from __future__ import annotations

import argparse

HELP = "print a kernel's kernel.json and the exact command the launcher will run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``show``."""
    parser.add_argument("name", metavar="NAME", help="kernel to show")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Show the installed kernel.json (or the one ``install`` would write) and the launch command."""
    import json
    import shlex

    from hpc_kernels import kernelspec, launch, registry, ui
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.launchspec import read_kernel_json

    reg = registry.load(args.registry)
    entry = reg.get(args.name)
    installed = kernelspec.installed_ours().get(entry.name)
    if installed:
        try:
            data, spec = read_kernel_json(str(installed / "kernel.json"))
        except ValueError as exc:  # launchspec.KernelSpecError: a damaged kernel.json, one sentence
            raise HpcKernelsError(str(exc)) from None
    else:
        dest = kernelspec.Target().kernels_dir() / entry.name / "kernel.json"
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
        from hpc_kernels import jobkernel

        script, extra = jobkernel.sbatch_plan(spec, "<sid>", jobkernel.sessions_dir() / "<sid>.json")
        job_script = f"# submitted with: {shlex.join(['sbatch', '--parsable', *extra])}\n{script}"
    if args.json:
        ui.print_json({"kernel": entry.name, "installed": str(installed) if installed else None,
                       "kernel_json": data, "command": argv if command else None, "problem": problem,
                       "warnings": warnings, "job_script": job_script})
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
    return 0
