"""The shape every container-runtime adapter has, so callers and tests can swap in a fake."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hpc_kernels.registry import KernelEntry

LineSink = Callable[[str], None]
#: Runs an argv inside an image; its exit code and output (see hpc_kernels.build.imagecheck).
ImageRunner = Callable[[Sequence[str]], "tuple[int, str]"]


class Builder(Protocol):
    """Builds an image from a recipe into ``dest`` (a temporary path the caller renames)."""

    name: str

    def version(self) -> str:
        """The runtime's version string."""

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Build ``recipe`` into ``dest``; every output line goes to ``on_line``; raise BuildError on failure."""

    def runner(self, entry: KernelEntry, image: str) -> ImageRunner:
        """Runs commands in the built ``image`` the way ``entry``'s kernel runs (to check it can start)."""
