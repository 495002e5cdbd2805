"""The model of hpc-kernels: the frozen dataclasses every module carries and the vocabulary as str-enums.
No YAML and nothing else of ours is imported here (the registry validates, this only holds).

- :mod:`.words`: ``Runtime``, ``Mode``, ``ImageStatus``, ``Staging``, ``Fetch``, ``JobKind`` — str-enums that
  compare and serialise as their words (``Runtime("docker") == "docker"``, ``json.dumps(Runtime.DOCKER) ==
  '"docker"'``); ``str()`` and f-strings give the word on every Python the package supports.
- :mod:`.launch`: ``LaunchSpec`` (kernel.json's launch spec) and ``JobRequest`` (a job kernel's allocation).
- :mod:`.entry`: ``KernelEntry``, ``SlurmSettings``/``SlurmFlags``, the default Docker/Podman tag.
- :mod:`.jobs`: ``JobRecord``/``TaskRecord``, our records of Slurm jobs.

``from hpc_kernels.model import X`` works for every name; a submodule is imported when one of its names is
first asked for (PEP 562), so the launcher, on every kernel start, pays only for :mod:`.words` and
:mod:`.launch` (the other dataclasses cost ~3 ms to create and it never uses them).
"""

from __future__ import annotations

import importlib

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from hpc_kernels.model.entry import (
        NO_FLAGS,
        UNSET,
        KernelEntry,
        SlurmFlags,
        SlurmSettings,
    )
    from hpc_kernels.model.jobs import GENERATOR, JOB_RECORD_FORMAT, JobRecord, TaskRecord
    from hpc_kernels.model.launch import (
        LAUNCH_SPEC_FORMAT,
        LOCAL_IMAGE_PREFIX,
        JobRequest,
        LaunchSpec,
        default_container_image,
        human_time,
    )
    from hpc_kernels.model.words import Fetch, ImageStatus, JobKind, Mode, Runtime, Staging

#: Each public name → the submodule that defines it.
_HOMES: dict[str, str] = {
    "Runtime": "words",
    "Mode": "words",
    "ImageStatus": "words",
    "Staging": "words",
    "Fetch": "words",
    "JobKind": "words",
    "JobRequest": "launch",
    "human_time": "launch",
    "LAUNCH_SPEC_FORMAT": "launch",
    "LaunchSpec": "launch",
    "SlurmSettings": "entry",
    "UNSET": "entry",
    "SlurmFlags": "entry",
    "NO_FLAGS": "entry",
    "LOCAL_IMAGE_PREFIX": "launch",
    "default_container_image": "launch",
    "KernelEntry": "entry",
    "JOB_RECORD_FORMAT": "jobs",
    "GENERATOR": "jobs",
    "TaskRecord": "jobs",
    "JobRecord": "jobs",
}
__all__ = [
    "GENERATOR",
    "JOB_RECORD_FORMAT",
    "LAUNCH_SPEC_FORMAT",
    "LOCAL_IMAGE_PREFIX",
    "NO_FLAGS",
    "UNSET",
    "Fetch",
    "ImageStatus",
    "JobKind",
    "JobRecord",
    "JobRequest",
    "KernelEntry",
    "LaunchSpec",
    "Mode",
    "Runtime",
    "SlurmFlags",
    "SlurmSettings",
    "Staging",
    "TaskRecord",
    "default_container_image",
    "human_time",
]


def __getattr__(name: str) -> object:
    """Import the submodule that defines ``name`` (once; the name is then a plain module attribute)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hpc_kernels.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hpc_kernels.model.{home}"), name)
    globals()[name] = value
    return value
