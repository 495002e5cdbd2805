"""Podman as a runtime: Docker's plugin with other data (shpc's ``container/podman.py`` is 23 lines).

Where the two CLIs differ it is a value of :class:`~hpc_kernels.runtimes.base.Features`: NVIDIA GPUs
through CDI (as the NVIDIA container toolkit sets it up for Podman), ``rm -f -t 0`` (Podman would wait
10 s for a SIGTERM to work), and no Docker Desktop check.
"""

from __future__ import annotations

from dataclasses import replace

from hpc_kernels.runtimes.docker import FEATURES as DOCKER_FEATURES
from hpc_kernels.runtimes.docker import ROCM_FLAGS, Docker

FEATURES = replace(
    DOCKER_FEATURES,
    gpu_flags={"nvidia": ("--device", "nvidia.com/gpu=all"), "rocm": ROCM_FLAGS},
    rm_flags=("-t", "0"),
    desktop_check=False,
    binary_variable="HPC_KERNELS_PODMAN",
    programs=("podman",),
)


class Podman(Docker):
    """The :class:`hpc_kernels.runtimes.base.Runtime` of Podman kernels."""

    name = "podman"
    features = FEATURES


RUNTIME = Podman()
