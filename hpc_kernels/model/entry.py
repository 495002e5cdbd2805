"""A registry kernel as the registry resolved it (:class:`KernelEntry`) and the ``slurm:`` settings of each
level (:class:`SlurmSettings`, and :class:`SlurmFlags` for ``build --slurm``'s flags). Not on the
launcher's path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from hpc_kernels.model.launch import JobRequest, LaunchSpec
from hpc_kernels.model.words import Mode, Runtime, Staging

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:

    # Type only: an image reference (``base:``) is parsed by the registry.
    from hpc_kernels import oci


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

    def launch_spec(self, *, command: tuple[str, ...] | None = None, registry: str = "",
                    runtime_hint: str = "") -> LaunchSpec:
        """This kernel's launch spec, its fields as the registry resolved them (``command``: the one found
        for its image, else the registry's). One mapping for ``kernelspec.launch_spec`` (what an install
        writes) and the image check (which runs the image under the kernel's rules)."""
        return LaunchSpec(
            kernel=self.name,
            runtime=self.runtime,
            mode=self.mode,
            image=str(self.image),
            command=self.command if command is None else command,
            binds=self.binds,
            env=self.env,
            pass_env=self.pass_env,
            gpu=self.gpu,
            runtime_args=self.runtime_args,
            idle_timeout=self.idle_timeout,
            container_image=self.container_image,
            registry=registry,
            runtime_hint=runtime_hint,
            job=self.job,
        )
