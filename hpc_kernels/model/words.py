"""The vocabulary as str-enums: runtimes, modes, image and job states, staging (see :mod:`hpc_kernels.model`).

Standard library only: the launcher imports this on every kernel start.
"""

from __future__ import annotations

import enum


class _Word(str, enum.Enum):
    """An enum whose members are words: printed, formatted and compared as the word."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def words(cls) -> tuple[str, ...]:
        """Every member's word, in definition order (for messages and validation)."""
        return tuple(m.value for m in cls)


class Runtime(_Word):
    """The container program a kernel runs under."""

    APPTAINER = "apptainer"
    DOCKER = "docker"
    PODMAN = "podman"


class Mode(_Word):
    """How a kernel uses its container: a container per kernel, or a shared one per user and kernel."""

    EXEC = "exec"
    INSTANCE = "instance"


class ImageStatus(_Word):
    """Where a kernel's image stands against its inputs (``hpc-kernels list``)."""

    BUILT = "built"
    STALE = "stale"
    MISSING = "missing"
    FOREIGN = "foreign"  # exists, not built by hpc-kernels: never overwritten
    EXTERNAL = "external"  # an image given as is (no recipe)
    EXTERNAL_MISSING = "external-missing"
    DAMAGED = "damaged"  # size or mtime differ from what was built (truncated, replaced)
    NO_RUNTIME = "no-runtime"  # Docker/Podman not installed here
    UNREADABLE = "unreadable"  # the image or its record cannot be read by this user (a group's)
    UNCHECKED = "unchecked"  # present, but its inputs cannot be read to compare


class Staging(_Word):
    """The registry's ``staging:`` setting."""

    AUTO = "auto"  # stage for `build --slurm` (the job builds offline); a local build fetches as the recipe says
    ALWAYS = "always"  # stage for every build: no build ever fetches anything itself
    NEVER = "never"  # never stage: builds (jobs too) fetch as the recipe says (Fir's compute nodes have internet)


class Fetch(_Word):
    """Where one build takes its inputs from."""

    NETWORK = "network"  # the recipe fetches during the build (a base digest is pinned when it can be looked up)
    STAGE = "stage"  # fetch into the staging cache now, then build from it
    STAGED = "staged"  # from the staging cache only; never the network


class JobKind(_Word):
    """What a Slurm job of ours does: ``build --slurm``'s build and install jobs, a job kernel's job."""

    BUILD = "build"
    INSTALL = "install"
    KERNEL = "kernel"
