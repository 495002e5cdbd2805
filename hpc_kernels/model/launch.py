"""What the launcher reads: :class:`LaunchSpec` (stored in kernel.json) and a job kernel's
:class:`JobRequest`. Standard library only: imported on every kernel start.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from hpc_kernels.model.words import Mode, Runtime

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class JobRequest:
    """The Slurm allocation a job kernel runs in (``job:`` in the registry); values already validated."""

    time: str = "1:00:00"
    mem: str = "4G"
    cpus: int = 1
    gpus: str = ""
    account: str | None = None
    partition: str | None = None
    extra_args: tuple[str, ...] = ()

    def summary(self) -> str:
        """The resources as a display name shows them: ``1 GPU, 32G, 2:00:00``."""
        parts = []
        if self.gpus and self.gpus.rsplit(":", 1)[-1] != "0":
            kind, _, count = self.gpus.rpartition(":")
            parts.append(f"{count} {kind + ' ' if kind else ''}GPU{'s' if count != '1' else ''}")
        if self.cpus != 1:
            parts.append(f"{self.cpus} CPUs")
        parts += [self.mem, human_time(self.time)]
        return ", ".join(parts)


_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def human_time(value: str) -> str:
    """A Slurm time limit as a menu shows it: ``2:00:00`` -> ``2 h``, ``90`` -> ``1 h 30 min``, ``1-0`` -> ``1 d``."""
    match = _SLURM_TIME_RE.match(value.strip())
    if not match:
        return value
    days, first, second, third = match.groups()
    if days is not None:
        minutes = int(days) * 1440 + int(first) * 60 + int(second or 0)
    elif third is not None:
        minutes = int(first) * 60 + int(second)
    else:
        minutes = int(first)  # minutes, or minutes:seconds
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    text = " ".join(f"{n} {unit}" for n, unit in ((d, "d"), (h, "h"), (m, "min")) if n)
    return text or value


#: The format of a launch spec (``LaunchSpec.to_json``'s ``format``; hpc_kernels.launchspec checks it).
LAUNCH_SPEC_FORMAT = 1


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the launcher decides from; resolved against the node only at launch
    (stored in kernel.json: :mod:`hpc_kernels.launchspec` reads and checks it)."""

    kernel: str
    runtime: Runtime
    mode: Mode
    image: str
    command: tuple[str, ...]
    binds: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = ()
    gpu: str = "auto"
    runtime_args: tuple[str, ...] = ()
    idle_timeout: float = 300.0
    container_image: str | None = None
    image_id: str = ""
    registry: str = ""
    #: The runtime found when the kernelspec was installed: used when the server's PATH has none
    #: (a JupyterHub session where `module load apptainer` was not done).
    runtime_hint: str = ""
    #: Set for a job kernel: the kernel runs in a Slurm allocation of its own (hpc_kernels.runtimes.job).
    job: JobRequest | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists)."""
        data = asdict(self)
        data["env"] = dict(self.env)
        data["format"] = LAUNCH_SPEC_FORMAT
        return data


#: Where images hpc-kernels builds for Docker/Podman are tagged (``localhost/hpc-kernels/NAME:latest``).
LOCAL_IMAGE_PREFIX = "localhost/hpc-kernels/"


def default_container_image(kernel: str) -> str:
    """The tag of a Docker/Podman kernel's image when the registry names none: the one place it is made."""
    return f"{LOCAL_IMAGE_PREFIX}{kernel}:latest"
