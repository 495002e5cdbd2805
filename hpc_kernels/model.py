"""The vocabulary of hpc-kernels as types: runtimes, modes and states are enums, not bare strings.

Standard library only (the launcher imports this on every kernel start). Each enum is a ``str`` so that
values read from kernel.json, the registry or a record compare and serialise as the plain words they are
(``Runtime("docker") == "docker"``, ``json.dumps(Runtime.DOCKER) == '"docker"'``), while code names
them as members. ``str()`` and f-strings give the word itself on every Python the package supports.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, fields

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    # Type only: an image reference (``base:``) is parsed by the registry, never by the launcher.
    from hpc_kernels import oci


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


# ----------------------------------------------------------------------------- Slurm settings


@dataclass(frozen=True)
class SlurmSettings:
    """Slurm settings of one level: a kernel's ``slurm:``, ``defaults: slurm:``, or ``build --slurm``'s flags
    (:class:`SlurmFlags`); ``None`` = not set here (a lower level or the built-in decides)."""

    account: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus: int | None = None
    partition: str | None = None
    modules: tuple[str, ...] | None = None
    extra_args: tuple[str, ...] | None = None

    def over(self, lower: SlurmSettings) -> SlurmSettings:
        """Key by key: this level's value where it has one, else ``lower``'s."""
        return SlurmSettings(**{
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(lower, f.name)
            for f in fields(self)
        })


#: No setting at any level (the built-in defaults decide).
UNSET = SlurmSettings()


@dataclass(frozen=True)
class SlurmFlags(SlurmSettings):
    """``build --slurm``'s flags (``--account``, ``--time``...): the level above every registry setting.
    Made by :func:`hpc_kernels.keys.slurm_from_flags`, which checks them by the registry's rules."""


#: No flag given.
NO_FLAGS = SlurmFlags()


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


# ----------------------------------------------------------------------------- kernels

#: Where images hpc-kernels builds for Docker/Podman are tagged (``localhost/hpc-kernels/NAME:latest``).
LOCAL_IMAGE_PREFIX = "localhost/hpc-kernels/"


def default_container_image(kernel: str) -> str:
    """The tag of a Docker/Podman kernel's image when the registry names none: the one place it is made."""
    return f"{LOCAL_IMAGE_PREFIX}{kernel}:latest"


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


@dataclass(frozen=True)
class KernelEntry:
    """One kernel of the registry, fully resolved (absolute paths, defaults applied)."""

    name: str
    display_name: str
    language: str
    recipe: Path | None
    image: Path
    runtime: Runtime
    mode: Mode
    command: tuple[str, ...]
    binds: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    pass_env: tuple[str, ...]
    gpu: str
    interrupt_mode: str
    runtime_args: tuple[str, ...]
    fakeroot: bool
    compression: str
    idle_timeout: float
    container_image: str | None
    line: int
    slurm: SlurmSettings = UNSET  # kernel's `slurm:` over `defaults: slurm:` (build --slurm)
    origin: Path | None = None  # the registry file that defines it (another one than yours: `extends`)
    #: A job kernel: it runs in a Slurm allocation of its own (docs/job-kernels.md).
    job: JobRequest | None = None
    python: str | None = None  # `python: "3.12"`: the recipe is generated from python:3.12-slim
    base: oci.ImageRef | None = None  # `base:`: the recipe is generated from this image
    requirements: Path | None = None  # requirements.txt, pyproject.toml or a pip-compatible lock
    staging: Staging = Staging.AUTO
    #: True when the registry (the kernel or its defaults) sets ``command``: used as given, never
    #: adapted to the Python found in the image.
    command_given: bool = False

    @property
    def env_dict(self) -> dict[str, str]:
        """``env`` as a dict (kept as sorted pairs so the dataclass stays hashable)."""
        return dict(self.env)

    @property
    def buildable(self) -> bool:
        """hpc-kernels builds its image: it has a ``def`` recipe, or ``python:``/``base:`` to generate one."""
        return self.recipe is not None or self.python is not None or self.base is not None

    @property
    def recipe_origin(self) -> Path:
        """The directory relative paths of the kernel's recipe are read from."""
        if self.recipe is not None:
            return self.recipe.parent
        if self.origin is not None:
            return self.origin.parent
        from pathlib import Path  # why: the launcher imports this module and never needs pathlib

        return Path.cwd()

    @property
    def lock(self) -> Path | None:
        """Where 'build --lock' writes this kernel's lock (``<registry>.locks/<name>.txt``, beside the registry
        that defines it); builds use it while it exists."""
        if self.origin is None:
            return None
        return self.origin.with_name(f"{self.origin.stem}.locks") / f"{self.name}.txt"


# ----------------------------------------------------------------------------- build jobs


#: The format of a job record (``<state dir>/jobs/<job>.json``).
JOB_RECORD_FORMAT = 1
#: Who wrote a record: a file without it in the jobs directory is not ours and is ignored.
GENERATOR = "hpc-kernels"


@dataclass(frozen=True)
class TaskRecord:
    """One task of a recorded job: an array task (one kernel) or the whole job."""

    task_id: str  # "123" or "123_4"
    kernel: str  # one kernel, or "a, b" for an install job
    log: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {"task_id": self.task_id, "kernel": self.kernel, "log": self.log}


@dataclass(frozen=True)
class JobRecord:
    """What hpc-kernels remembers of a Slurm job it submitted (``<state dir>/jobs/<job>.json``), so that
    ``hpc-kernels jobs`` works where ``sacct`` has no accounting."""

    job_id: str
    kind: JobKind
    kernels: tuple[str, ...]
    tasks: tuple[TaskRecord, ...]
    submitted_at: float = 0.0
    array: bool = False
    registry: str = ""
    depends_on: str | None = None
    host: str = ""
    script: str = ""
    sbatch_args: tuple[str, ...] = ()
    #: The job's resources as submitted (time, mem, cpus, account, partition, modules, extra_args).
    options: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The record as written (lists for tuples, ``options`` an object)."""
        return {
            "generator": GENERATOR, "format": JOB_RECORD_FORMAT, "job_id": self.job_id, "kind": self.kind,
            "kernels": list(self.kernels), "array": self.array, "registry": self.registry,
            "depends_on": self.depends_on, "submitted_at": self.submitted_at, "host": self.host,
            "script": self.script, "sbatch_args": list(self.sbatch_args), "options": dict(self.options),
            "tasks": [t.to_json() for t in self.tasks],
        }

    @classmethod
    def from_json(cls, data: Any) -> JobRecord | None:
        """The record of ``data`` (a parsed file), or None when it is not one of ours (another generator,
        no tasks, an unknown kind). Tasks without an id are left out; missing optional keys take defaults."""
        if not isinstance(data, dict) or data.get("generator") != GENERATOR or not isinstance(data.get("tasks"), list):
            return None
        kind = data.get("kind", JobKind.BUILD)
        if kind not in JobKind.words() or "job_id" not in data:
            return None
        tasks = tuple(TaskRecord(str(t["task_id"]), str(t.get("kernel", "")), str(t.get("log", "")))
                      for t in data["tasks"] if isinstance(t, dict) and "task_id" in t)
        depends = data.get("depends_on")
        options = data.get("options")
        try:
            submitted = float(data.get("submitted_at", 0))
        except (TypeError, ValueError):
            submitted = 0.0
        return cls(
            job_id=str(data["job_id"]), kind=JobKind(kind),
            kernels=tuple(str(k) for k in data.get("kernels", []) or []), tasks=tasks,
            submitted_at=submitted, array=bool(data.get("array", False)),
            registry=str(data.get("registry", "")), depends_on=None if depends is None else str(depends),
            host=str(data.get("host", "")), script=str(data.get("script", "")),
            sbatch_args=tuple(str(a) for a in data.get("sbatch_args", []) or []),
            options=tuple(options.items()) if isinstance(options, dict) else (),
        )
