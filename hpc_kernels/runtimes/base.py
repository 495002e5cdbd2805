"""The contract every runtime keeps: what it is (data) and what each lifecycle step does, who calls it, when.

Written like jupyter_client's ``provisioning/provisioner_base.py``: each member says who calls it and at
what point of a kernel's life. A runtime is a module of ``hpc_kernels/runtimes/`` named in
:mod:`hpc_kernels.runtimes.table`, whose ``RUNTIME`` object has this shape; adding a runtime is adding
such a module and one line to the table.

A kernel's life, and who does each part:

1. **plan** — work out the argv, environment and warnings (no side effects). ``hpc-kernels show`` calls it;
   :meth:`Runtime.start` calls it on every kernel start.
2. **start** — the launcher (``python -I -S launch.py``, started by Jupyter) calls :meth:`Runtime.start`:
   it arms what outlives the kernel (a watcher, the shared instance's reaper or container watcher), then
   ``exec``s the runtime, so Jupyter's signals and kills reach it directly.
3. **attach** — shared modes (``mode: instance``): ``start`` attaches to the one instance/container of
   this user and kernel, starting it first under its lock.
4. **interrupt** — no method: Jupyter signals the process it started, which *is* the runtime (``exec``),
   or, for a supervised attach, the launcher that forwards the signal.
5. **cleanup** — no method either: the watcher/reaper armed by ``start`` removes what the kernel leaves
   when it ends, whichever way it ends (see docs/architecture.md, "What dies with a kernel").
6. **sweep** — ``hpc-kernels gc`` runs each runtime's :attr:`Runtime.sweepers` for what a killed
   watcher could not clean.

Import-light: the launcher imports the runtime it needs on every kernel start, and with ``python -S``
``typing`` alone costs ~10 ms, so ``Protocol`` is imported for the type checker only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# why: typing is not loaded on the launcher's path (python -S); the contract is structural, so at run
# time the classes below are plain classes and only mypy needs Protocol.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Protocol

    from hpc_kernels.model import KernelEntry, LaunchSpec
else:
    Protocol = object

LineSink = Callable[[str], None]
#: Runs an argv inside an image; its exit code and output (see hpc_kernels.build.imagecheck).
ImageRunner = Callable[[Sequence[str]], "tuple[int, str]"]
#: What launching a kernel would run: argv, the runtime's environment, warnings for Jupyter's log.
Plan = tuple[list[str], dict[str, str], list[str]]


@dataclass(frozen=True)
class Features:
    """What a runtime can do and how its command line differs, as data (shpc's ``features`` tables).

    Docker and Podman are one implementation; where they differ, it is a value here.
    """

    #: The ``mode:`` values its kernels may have.
    modes: tuple[str, ...] = ("exec", "instance")
    #: The image is a file on disk (a .sif) rather than a name in the runtime's image store.
    image_is_file: bool = False
    #: GPU flags per detected vendor (``hpc_kernels.runtimes.gpu.detect``): ``nvidia``, ``rocm``.
    gpu_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Extra arguments of ``rm -f`` (Podman waits 10 s for a SIGTERM unless told ``-t 0``).
    rm_flags: tuple[str, ...] = ()
    #: ``--network=host`` may land in a VM (Docker Desktop): ask ``info`` before starting a kernel.
    desktop_check: bool = False
    #: Environment variable that names the binary to use instead of the one on PATH.
    binary_variable: str = ""
    #: Its program's names on PATH, in the order they are looked for (recorded at install time).
    programs: tuple[str, ...] = ()
    #: ``hpc-kernels run NAME -- COMMAND`` can start a command in its container.
    runs_commands: bool = False
    #: Builds run the recipe hpc-kernels derives from the registry's (staged inputs, ``show --recipe``);
    #: otherwise the recipe is converted (a Dockerfile).
    staged_builds: bool = False


class Builder(Protocol):
    """Builds an image from a recipe into ``dest`` (a temporary path the caller renames).

    Called by the build orchestrator (``hpc_kernels.build``) only, which owns the digest, the lock,
    the log and the image state: an adapter only builds.
    """

    name: str

    def version(self) -> str:
        """The runtime's version string."""

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Build ``recipe`` into ``dest``; every output line goes to ``on_line``; raise BuildError on failure."""

    def runner(self, entry: KernelEntry, image: str) -> ImageRunner:
        """Runs commands in the built ``image`` the way ``entry``'s kernel runs (to check it can start)."""


class Runtime(Protocol):
    """One container runtime (or the Slurm job runtime that wraps one): the lifecycle of its kernels."""

    #: The word in the registry's ``runtime:`` and in kernel.json (a ``model.Runtime`` value).
    name: str
    #: What it can do (data, not code): see :class:`Features`.
    features: Features
    #: ``"module:function"`` sweepers ``hpc-kernels gc`` runs, in order (no import until gc runs);
    #: each is ``fn(dry_run) -> list[Leftover]``.
    sweepers: tuple[str, ...]
    #: Ids of ``hpc_kernels.doctor.base.CHECKS`` that apply to kernels of this runtime.
    doctor_checks: tuple[str, ...]

    def find_binary(self, environ: Mapping[str, str] | None = None, fallback: str = "") -> str:
        """The runtime's program on this node, now.

        Called by :meth:`plan`/:meth:`start` on every kernel start (the binary is resolved where the
        kernel starts, not where it was installed), by :meth:`builder`, and by doctor's runtime check.
        ``fallback`` is the path recorded at install time, the last resort. Raises RuntimeNotFoundError.
        """

    def builder(self, binary: str | None = None) -> Builder:
        """The adapter that builds this runtime's images.

        Called by the build orchestrator when an image is missing or stale; never on the launcher's path.
        """

    def plan(self, spec: LaunchSpec, connection_file: str, environ: Mapping[str, str]) -> Plan:
        """The argv, environment and warnings that launching ``spec`` would use; no side effects.

        Called by ``hpc-kernels show`` (to print the command) and by :meth:`start` (exec modes).
        """

    def start(self, spec: LaunchSpec, connection_file: str) -> int:
        """Start the kernel: arm its watcher (and attach to or start the shared instance), then ``exec``.

        Called by the launcher (``hpc_kernels.launch``) once per kernel start, in the process Jupyter
        started; returns only on error, or with the kernel's exit code for a supervised attach.
        """

    def image_reference(self, entry: KernelEntry) -> str:
        """The image as users see it: a .sif path, or a container image name.

        Called by ``list``, ``install`` and ``doctor`` (reports), and by the build orchestrator.
        """

    def has_records(self) -> bool:
        """Whether kernels of this runtime left state of ours on this host (shared instances' records, the
        mark a container kernel leaves when it starts).

        Called by ``hpc-kernels gc`` once per run: a runtime with records is asked for leftovers even when
        no installed kernel names it any more (its kernelspec was removed since).
        """
