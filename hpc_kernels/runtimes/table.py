"""The runtimes, by name: a plain name → module table (pre-commit's ``all_languages.py``).

Each module named here has a ``RUNTIME`` object of the :class:`hpc_kernels.runtimes.base.Runtime` shape.
Modules are imported when asked for, one at a time: the launcher, on every kernel start, imports only the
runtime its kernel uses. Adding a runtime is adding its module and one line here.
"""

from __future__ import annotations

import importlib

from hpc_kernels.errors import HpcKernelsError

TYPE_CHECKING = False  # why: typing is not loaded on the launcher's path (python -S)
if TYPE_CHECKING:
    from hpc_kernels.runtimes.base import Runtime

#: The container runtimes a kernel's ``runtime:`` may name, in the order gc and doctor go through them.
RUNTIMES: dict[str, str] = {
    "apptainer": "hpc_kernels.runtimes.apptainer",
    "docker": "hpc_kernels.runtimes.docker",
    "podman": "hpc_kernels.runtimes.podman",
}
#: The Slurm job runtime: wraps a kernel of any runtime above in a job of its own (``job:``).
JOB = "hpc_kernels.runtimes.job"


def get(name: str) -> Runtime:
    """The runtime called ``name`` (its module is imported now); HpcKernelsError for an unknown one."""
    module = RUNTIMES.get(str(name))
    if module is None:
        raise HpcKernelsError(f"runtime '{name}' cannot be launched by this version of hpc-kernels.")
    runtime: Runtime = importlib.import_module(module).RUNTIME
    return runtime


def job() -> Runtime:
    """The Slurm job runtime (imported now)."""
    runtime: Runtime = importlib.import_module(JOB).RUNTIME
    return runtime


def every() -> list[Runtime]:
    """Every container runtime, in table order (imports them all: not for the launcher)."""
    return [get(name) for name in RUNTIMES]


def sweepers() -> tuple[str, ...]:
    """Every runtime's gc sweepers, in table order (then the job runtime's), without duplicates."""
    names: list[str] = []
    for runtime in [*every(), job()]:
        names += [s for s in runtime.sweepers if s not in names]
    return tuple(names)
