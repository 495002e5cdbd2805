"""The adapter that builds Apptainer images: spython, pointed at the resolved runtime through a shim.

It only builds: the build orchestrator (hpc_kernels.build) owns the digest, the lock, the log and the
image state.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from subprocess import CalledProcessError
from typing import TYPE_CHECKING

from hpc_kernels import paths, templates
from hpc_kernels.build import guard as buildguard
from hpc_kernels.build import imagecheck
from hpc_kernels.errors import BuildError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.proc import run
from hpc_kernels.runtimes.apptainer.cli import find_binary

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry
    from hpc_kernels.runtimes.base import ImageRunner, LineSink


class Apptainer:
    """Builds images with spython, which we point at the resolved runtime through a shim."""

    name = "apptainer"

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_binary()

    def version(self) -> str:
        """``apptainer --version`` (e.g. ``apptainer version 1.4.5``)."""
        return run([self.binary, "--version"]).stdout.strip()

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Build ``recipe`` into ``dest`` through spython; every failure becomes a BuildError."""
        try:
            from spython.main import Client  # why: its absence is a BuildError, not an ImportError
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BuildError(recipe.stem, f"spython is not importable ({exc}); reinstall hpc-kernels.") from None
        lines: list[str] = []

        def sink(line: str) -> None:
            lines.append(line)
            on_line(line)

        with _spython_sees(self.binary), _cwd(recipe.parent):
            try:
                result = Client.build(
                    recipe=str(recipe), image=str(dest), sudo=False, stream=True,
                    options=list(options), quiet=True, force=True,
                )
                if not result:
                    raise BuildError(recipe.stem, "spython did not start a build", "")
                _image, stream = result
                for line in stream:
                    sink(line.rstrip("\n"))
            except CalledProcessError as exc:
                reason = f"apptainer build exited with code {exc.returncode}"
                raise BuildError(recipe.stem, reason, _tail(lines)) from None
            except SystemExit as exc:
                # spython calls sys.exit() from inside the library on some errors.
                raise BuildError(recipe.stem, f"spython gave up (exit {exc.code})", _tail(lines)) from None
            except OSError as exc:
                raise BuildError(recipe.stem, f"could not run the build: {exc}", _tail(lines)) from None
        if not dest.exists():
            raise BuildError(recipe.stem, "the build reported success but wrote no image", _tail(lines))

    def runner(self, entry: KernelEntry, image: str) -> ImageRunner:
        """``apptainer exec`` of the built image under the kernel's rules (no binds): see imagecheck."""
        return imagecheck.probe_spec_runner(entry, image, self.binary)


def _tail(lines: list[str], n: int = 25) -> str:
    kept = [ln for ln in lines if ln.strip()]
    return "\n".join(kept[-n:])


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    # %files sources are relative paths; run the build beside the recipe so they resolve there.
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _spython_sees(binary: str) -> Iterator[None]:
    """Put a private ``singularity`` shim first on PATH for this process only, during the build.

    The shim runs the runtime under :mod:`hpc_kernels.build.guard`, which ties the build's processes to
    this one (they die with it, whichever way it dies).
    """
    shim_dir = paths.cache_dir() / "spython-bin"
    shim = shim_dir / "singularity"
    guard = shlex.join(buildguard.argv())
    text = templates.render("singularity-shim.sh.tmpl", guard=guard, runtime=shlex.quote(binary))
    if not shim.exists() or shim.read_text() != text:
        atomic_write(shim, text, mode=0o755)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old
