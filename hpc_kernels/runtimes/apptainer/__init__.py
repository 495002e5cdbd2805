"""Apptainer (or SingularityCE) as a runtime: the plugin the runtime table names.

The modules, by role: :mod:`.cli` (the binary, exec and instance argv), :mod:`.builder` (spython builds),
:mod:`.execrecord` and :mod:`.watcher` (exec-mode kernels), :mod:`.instance`, :mod:`.records`,
:mod:`.attach` (the launcher's side), :mod:`.reaper` (shared instances), :mod:`.status` (``instances``,
``stop``), :mod:`.sweep` (gc). Import-light: the launcher imports this package on every Apptainer kernel
start; each lifecycle step imports the module of its mode only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hpc_kernels import selfexec
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import Mode
from hpc_kernels.runtimes.apptainer import cli
from hpc_kernels.runtimes.base import Features

TYPE_CHECKING = False  # why: typing is not loaded on the launcher's path (python -S)
if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry, LaunchSpec
    from hpc_kernels.runtimes.base import Builder, Plan

FEATURES = Features(
    modes=(Mode.EXEC.value, Mode.INSTANCE.value),
    image_is_file=True,
    gpu_flags=cli.GPU_FLAGS,
    binary_variable="HPC_KERNELS_APPTAINER",
    programs=("apptainer", "singularity"),
    runs_commands=True,
    staged_builds=True,
)


class Apptainer:
    """The :class:`hpc_kernels.runtimes.base.Runtime` of Apptainer kernels."""

    name = "apptainer"
    features = FEATURES
    sweepers = (
        # Instance state first, so that processes of instances it just forgot count as orphans.
        "hpc_kernels.runtimes.apptainer.sweep:sweep_state",
        "hpc_kernels.runtimes.apptainer.sweep:sweep_orphans",
        "hpc_kernels.runtimes.apptainer.sweep:sweep_kernels",
    )
    doctor_checks = ("runtime", "runtime-version", "build-namespaces", "binds", "ipykernel", "gpu")

    def find_binary(self, environ: Mapping[str, str] | None = None, fallback: str = "") -> str:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.find_binary`."""
        return cli.find_binary(environ, fallback)

    def builder(self, binary: str | None = None) -> Builder:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.builder`."""
        from hpc_kernels.runtimes.apptainer.builder import Apptainer  # why: builds only, not the launcher

        return Apptainer(binary)

    def plan(self, spec: LaunchSpec, connection_file: str, environ: Mapping[str, str]) -> Plan:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.plan`."""
        if spec.mode == Mode.INSTANCE:
            from hpc_kernels.runtimes.apptainer import attach  # why: the launcher imports one mode's module

            return attach.plan(spec, connection_file, environ)
        binary = cli.find_binary(environ, fallback=spec.runtime_hint)
        return cli.exec_command(spec, connection_file, binary, environ)

    def start(self, spec: LaunchSpec, connection_file: str) -> int:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.start`."""
        if not os.path.exists(spec.image):
            raise HpcKernelsError(
                f"the image of kernel '{spec.kernel}' is missing ({spec.image}); build it with "
                f"'hpc-kernels build {spec.kernel}'."
            )
        if spec.mode == Mode.INSTANCE:
            from hpc_kernels.runtimes.apptainer import attach  # why: the launcher imports one mode's module

            return int(attach.launch(spec, connection_file))
        from hpc_kernels.runtimes.apptainer import watcher  # why: the launcher imports one mode's module

        argv, env, warnings = self.plan(spec, connection_file, os.environ)
        # A watcher ends the kernel when Jupyter dies and kills what Apptainer leaves on a SIGKILL.
        env, more = watcher.arm(spec, env, argv[0])
        return selfexec.exec_runtime(argv, env, warnings + more)

    def image_reference(self, entry: KernelEntry) -> str:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.image_reference`: the .sif path."""
        return str(entry.image)

    def has_records(self) -> bool:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.has_records`: shared instances' state here."""
        from hpc_kernels.runtimes.apptainer import instance  # why: gc only, not the launcher

        return instance.root().is_dir()


RUNTIME = Apptainer()
