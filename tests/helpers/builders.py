"""The one fake builder of the tests: stands in for a runtime's builder (``runtimes.base.Builder``).

It builds nothing: it prints a long line like Apptainer's ``%post``, writes ``image from <recipe text>`` as the
image (or fails like Apptainer), records every call, and its runner answers the image check from a table of the
programs the image "holds". Tests that need a twist subclass it (override ``build`` or ``runner``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hpc_kernels.errors import BuildError
from hpc_kernels.runtimes.base import ImageRunner, LineSink

#: A recipe with every kind of input (files, a local base image, a builder stage) for builds with the fake.
DEF = """\
Bootstrap: localimage
From: base.sif

%files
    data/*.txt /opt/data/
    env.yml

%files from builder
    /ignored /ignored

%post
    echo hi
"""

#: What a fake build prints: a long line, like Apptainer's ``%post`` output (progress must not cut kernel names).
POST_LINE = "INFO:    Running post scriptlet: pip install numpy scipy matplotlib pandas ipykernel " * 2


class FakeBuilder:
    """Writes the recipe into the image, or fails, and records each call.

    ``fail``: the build fails as ``apptainer build`` does; ``delay``: seconds each build takes; ``programs``:
    what the built image holds, program -> ``"ok"`` (runs) or the traceback running it with ``-c CODE`` prints
    (default: only ``python3``, which runs). A build prints :data:`POST_LINE` before it writes the image.
    """

    name = "fake"

    def __init__(self, fail: bool = False, delay: float = 0.0, programs: Mapping[str, str] | None = None) -> None:
        #: The options of each build.
        self.calls: list[list[str]] = []
        #: The recipe (its text, its path) of each build.
        self.recipes: list[str] = []
        self.recipe_files: list[Path] = []
        self.fail = fail
        self.delay = delay
        self.programs = {"python3": "ok"} if programs is None else programs
        #: Every argv the image check ran in a built image.
        self.ran: list[list[str]] = []

    def version(self) -> str:
        """The fake runtime's version."""
        return "fake 1"

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Record the call, print a line, wait ``delay``, then fail or write ``image from <recipe>`` to ``dest``."""
        self.calls.append(options)
        self.recipes.append(recipe.read_text())
        self.recipe_files.append(recipe)
        on_line(POST_LINE)
        time.sleep(self.delay)
        if self.fail:
            on_line("FATAL: %post failed")
            raise BuildError(recipe.stem, "apptainer build exited with code 255", "FATAL: %post failed")
        dest.write_text("image from " + recipe.read_text())

    def runner(self, entry: object, image: str) -> ImageRunner:
        """Runs an argv "in" ``image``: as ``programs`` says, after checking the image is the one just built."""

        def run(argv: Sequence[str]) -> tuple[int, str]:
            assert Path(image).read_text().startswith("image from")  # the new image, before it replaces the old
            self.ran.append(list(argv))
            behaviour = self.programs.get(argv[0])
            if behaviour is None:
                return 255, f'FATAL:   "{argv[0]}": executable file not found in $PATH'
            if behaviour == "ok":
                return 0, ""
            return 1, f"Traceback (most recent call last):\n{behaviour}"

        return run
