"""The shape every container-runtime adapter has, so callers and tests can swap in a fake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

LineSink = Callable[[str], None]


class Builder(Protocol):
    """Builds an image from a recipe into ``dest`` (a temporary path the caller renames)."""

    name: str

    def version(self) -> str:
        """The runtime's version string."""

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Build ``recipe`` into ``dest``; every output line goes to ``on_line``; raise BuildError on failure."""
