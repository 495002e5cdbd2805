"""The vocabulary of hpc-kernels as types: runtimes, modes and states are enums, not bare strings.

Standard library only (the launcher imports this on every kernel start). Each enum is a ``str`` so that
values read from kernel.json, the registry or a record compare and serialise as the plain words they are
(``Runtime("docker") == "docker"``, ``json.dumps(Runtime.DOCKER) == '"docker"'``), while code names
them as members. ``str()`` and f-strings give the word itself on every Python the package supports.
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
