"""The program a kernelspec's argv runs: ``python -I -S .../hpc_kernels/launch.py KERNEL_JSON CONNECTION_FILE``
(``python -m hpc_kernels.launch KERNEL_JSON CONNECTION_FILE`` works too).

It reads the launch spec from kernel.json, resolves the runtime *on this node, now* (apptainer,
else singularity), picks GPU flags for the devices present, cleans the environment, starts the
kernel's watcher (through the runtime table: the runtime's watcher, container watcher or instance reaper)
and ``exec``s the runtime, so jupyter_client's signals and kills reach it directly.
Imports stay minimal (the standard library and hpc_kernels only, never jupyter_core, yaml or rich):
this runs on every kernel start.
"""

from __future__ import annotations

import os
import sys

if not __package__:
    # Run as a script, as the kernelspec does: ``-I`` leaves the script's directory off sys.path and
    # ``-S`` skips ``site`` (its .pth files are most of an interpreter's start-up), so nothing would find
    # hpc_kernels: put the directory that holds this package first (site-packages, or a source tree).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collections.abc import Sequence

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.launchspec import KernelSpecError, read_kernel_json
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes import table


def plan(spec: LaunchSpec, connection_file: str) -> tuple[list[str], dict[str, str], list[str]]:
    """The command, environment and warnings that launching ``spec`` would use (exec modes)."""
    return table.get(spec.runtime).plan(spec, connection_file, os.environ)


def launch(spec: LaunchSpec, connection_file: str) -> int:
    """Start the kernel for ``spec``; returns only on error (or for supervised modes).

    The runtime table imports the one runtime the kernel uses (a job kernel: the Slurm job runtime, which
    relays to the kernel in its own allocation), whose ``start`` arms the kernel's watcher and ``exec``s.
    """
    runtime = table.job() if spec.job is not None else table.get(spec.runtime)
    return runtime.start(spec, connection_file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors go to stderr (Jupyter's log) with a non-zero exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m hpc_kernels.launch KERNEL_JSON CONNECTION_FILE", file=sys.stderr)
        return 2
    spec_file, connection_file = args
    try:
        _data, spec = read_kernel_json(spec_file)
    except KernelSpecError as exc:  # a damaged kernel.json: the sentence names the field and the fix
        print(f"hpc-kernels: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"hpc-kernels: cannot read the kernel spec {spec_file}: {exc.strerror or exc}.", file=sys.stderr)
        return 1
    try:
        return launch(spec, connection_file)
    except HpcKernelsError as exc:
        print(f"hpc-kernels: {exc}", file=sys.stderr)
    except OSError as exc:
        # Not the kernel spec's fault (it was read): most often our state directory (a read-only home).
        from hpc_kernels.paths import unwritable_hint  # why: the error path only

        where = f" ({exc.filename})" if exc.filename else ""
        reason = unwritable_hint(exc) or f"{exc.strerror or exc}{where}."
        print(f"hpc-kernels: kernel '{spec.kernel}' could not start: {reason}", file=sys.stderr)
    except ValueError as exc:
        print(f"hpc-kernels: kernel '{spec.kernel}' could not start: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
