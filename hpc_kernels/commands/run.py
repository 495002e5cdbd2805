"""``hpc-kernels run NAME [--] COMMAND...``: a command in a kernel's container, under the kernel's rules.

For scripts and batch jobs (``hpc-kernels run science -- python analysis.py`` in an sbatch script): the
same image, runtime resolution (apptainer, else singularity, on this node now), cleaned environment
(allowlist + the kernel's ``env``/``pass_env`` + ``PYTHONNOUSERSITE``), binds, GPU flags and
``-W $SLURM_TMPDIR`` as the kernel, through the very function the kernel launcher uses. The process
becomes the runtime (``os.execve``), so the command's exit code, signals and stdio are the caller's.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry

HELP = "run a command in a kernel's container, with the kernel's environment, binds and GPU flags"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``run`` (they go before NAME: everything after NAME is the command)."""
    parser.usage = "%(prog)s [-h] [--registry PATH] [--dry-run] NAME [--] [COMMAND ...]"
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runtime command line (with its container variables) instead of running it")
    parser.add_argument("name", metavar="NAME", help="the kernel whose container and rules to use")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the command to run, after '--' when it has options of its own "
                             "(default: the interpreter of the kernel's command, e.g. python3)")


def check_supported(entry: KernelEntry) -> None:
    """Refuse, in one sentence, kernels whose container ``run`` cannot start yet."""
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.runtimes import table

    if not table.get(entry.runtime).features.runs_commands:
        raise HpcKernelsError(
            f"'hpc-kernels run' is not supported for kernel '{entry.name}' yet: it uses runtime "
            f"'{entry.runtime}', and run only starts Apptainer containers; use '{entry.runtime} run' yourself."
        )


def installed_runtime_hint(name: str) -> str:
    """The runtime the kernelspec Jupyter uses for ``name`` recorded at install time (the launcher's last
    resort when none is on PATH), or ""."""
    from hpc_kernels import specdirs
    from hpc_kernels.launchspec import read_kernel_json

    kdir = specdirs.visible(name)
    if kdir is None or not specdirs.is_ours(kdir):
        return ""
    try:
        _data, spec = read_kernel_json(str(kdir / "kernel.json"))
    except (OSError, ValueError):
        return ""
    return spec.runtime_hint


def run(args: argparse.Namespace) -> int:
    """Resolve the kernel's container command now and become it (or print it with ``--dry-run``)."""
    import os
    import shlex
    import sys

    import hpc_kernels.runtimes.apptainer.cli as apptainer
    from hpc_kernels import kernelspec, registry
    from hpc_kernels.errors import HpcKernelsError

    command = list(args.command)
    if command[:1] == ["--"]:  # argparse versions differ on whether REMAINDER keeps the '--'
        command = command[1:]
    reg = registry.load(args.registry)
    entry = reg.get(args.name)
    check_supported(entry)
    spec = kernelspec.launch_spec(entry, reg.path)
    if not os.path.exists(spec.image):
        raise HpcKernelsError(
            f"the image of kernel '{entry.name}' is missing ({spec.image}); build it with "
            f"'hpc-kernels build {entry.name}'."
        )
    # Like the launcher: apptainer/singularity on PATH, else the one recorded when the kernel was installed.
    binary = apptainer.find_binary(fallback=installed_runtime_hint(entry.name))
    argv, env, warnings = apptainer.run_command(spec, command, binary, os.environ)
    for warning in warnings:
        print(f"hpc-kernels: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        prefix = apptainer.env_prefix(binary)
        ours = [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(prefix)]
        print(shlex.join([*ours, *argv]))
        return 0
    # A watcher, as for an exec kernel but not tied to a Jupyter process: when the command is killed
    # (SIGKILL, a job's time limit), what Apptainer leaves (squashfuse_ll, the command's children) goes too.
    from hpc_kernels.runtimes.apptainer import watcher  # why: only a real run needs it, not --dry-run

    env, more = watcher.arm(spec, env, argv[0], watch_parent=False)
    for warning in more:
        print(f"hpc-kernels: warning: {warning}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the runtime, as the kernel launcher does: the command's exit code is ours.
    os.execve(argv[0], argv, env)
    return 1  # pragma: no cover - execve does not return
