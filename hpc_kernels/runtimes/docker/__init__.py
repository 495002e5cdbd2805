"""Docker as a runtime: the plugin the runtime table names (Podman is this with other data: ../podman.py).

The modules, by role: :mod:`.cli` (the ``docker``/``podman`` command line), :mod:`.dockerfile` (recipe
conversion), :mod:`.build` (their build orchestrator), :mod:`.container` (the launcher's side: one
container per kernel, or a shared one), :mod:`.watcher` (the container watcher), :mod:`.sweep` (gc).
Import-light: the launcher imports this package on every Docker/Podman kernel start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hpc_kernels import selfexec
from hpc_kernels.model import Mode
from hpc_kernels.runtimes.base import Features

TYPE_CHECKING = False  # why: typing is not loaded on the launcher's path (python -S)
if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry, LaunchSpec
    from hpc_kernels.runtimes.base import Builder, Plan

#: AMD GPUs in a container, the same for Docker and Podman.
ROCM_FLAGS = ("--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video")

FEATURES = Features(
    modes=(Mode.EXEC.value, Mode.INSTANCE.value),
    gpu_flags={"nvidia": ("--gpus", "all"), "rocm": ROCM_FLAGS},
    desktop_check=True,  # Docker Desktop runs containers in a VM: --network=host would not reach us
    binary_variable="HPC_KERNELS_DOCKER",
    programs=("docker",),
)


class Docker:
    """The :class:`hpc_kernels.runtimes.base.Runtime` of Docker kernels (and, subclassed, Podman's)."""

    name = "docker"
    features = FEATURES
    sweepers = ("hpc_kernels.runtimes.docker.sweep:sweep",)
    doctor_checks = ("runtime",)

    def find_binary(self, environ: Mapping[str, str] | None = None, fallback: str = "") -> str:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.find_binary` (``fallback`` is not used: the CLI
        talks to a daemon or service of this host)."""
        from hpc_kernels.runtimes.docker import cli  # why: shutil; the launcher's path goes through start

        return cli.find_binary(self.name, environ)

    def builder(self, binary: str | None = None) -> Builder:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.builder`: the CLI itself builds."""
        from hpc_kernels.runtimes.docker import cli  # why: builds only, not the launcher

        return cli.ContainerCLI(self.name, binary)

    def plan(self, spec: LaunchSpec, connection_file: str, environ: Mapping[str, str]) -> Plan:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.plan`."""
        from hpc_kernels.runtimes.docker import container  # why: the launcher imports what it runs only

        return container.plan(spec, connection_file, environ)

    def start(self, spec: LaunchSpec, connection_file: str) -> int:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.start`: the watcher first (and, in mode instance,
        the shared container), so no exit path leaks, then exec the client."""
        from hpc_kernels.runtimes.docker import container  # why: the launcher imports what it runs only

        argv, env, warnings = container.arm(spec, connection_file, os.environ)
        return selfexec.exec_runtime(argv, env, warnings)

    def image_reference(self, entry: KernelEntry) -> str:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.image_reference`: the image's name."""
        return str(entry.container_image)

    def has_records(self) -> bool:
        """See :meth:`hpc_kernels.runtimes.base.Runtime.has_records`: a kernel of ours started here."""
        from hpc_kernels.runtimes.docker import container  # why: gc only, not the launcher

        return self.name in container.runtimes_marked()


RUNTIME = Docker()
