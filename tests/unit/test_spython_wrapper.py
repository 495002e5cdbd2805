"""spython reports failures by returning None, raising, or calling sys.exit: each becomes a BuildError."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels.build import guard as buildguard
from hpc_kernels.errors import BuildError
from hpc_kernels.runtimes.apptainer import builder as app_builder


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "k.def"
    path.write_text("Bootstrap: localimage\nFrom: base.sif\n")
    return path


def patch_build(monkeypatch: pytest.MonkeyPatch, behaviour: Any) -> list[dict[str, Any]]:
    from spython.main import Client

    calls: list[dict[str, Any]] = []

    def fake_build(**kwargs: Any) -> Any:
        import os
        import shutil

        calls.append({**kwargs, "singularity": shutil.which("singularity"), "cwd": os.getcwd()})
        return behaviour(kwargs)

    monkeypatch.setattr(Client, "build", fake_build)
    return calls


def stream(lines: list[str], returncode: int) -> Iterator[str]:
    yield from (line + "\n" for line in lines)
    if returncode:
        raise subprocess.CalledProcessError(returncode, ["singularity", "build"])


def test_success_streams_lines_through_a_private_shim(monkeypatch: pytest.MonkeyPatch, recipe: Path,
                                                       tmp_path: Path) -> None:
    def ok(kwargs: dict[str, Any]) -> Any:
        Path(kwargs["image"]).write_text("sif")
        return kwargs["image"], stream(["INFO: Starting build...", "INFO: Build complete"], 0)

    calls = patch_build(monkeypatch, ok)
    seen: list[str] = []
    before = __import__("os").environ["PATH"]
    app_builder.Apptainer("/opt/x/bin/apptainer").build(recipe, tmp_path / "out.sif", ["--fakeroot"], seen.append)
    assert seen == ["INFO: Starting build...", "INFO: Build complete"]
    call = calls[0]
    assert call["sudo"] is False and call["options"] == ["--fakeroot"] and call["stream"] is True
    assert call["cwd"] == str(recipe.parent)  # %files paths resolve beside the recipe
    shim = Path(call["singularity"])
    # The runtime runs under the build guard (its processes die with hpc-kernels), stderr merged into stdout.
    guard = shlex.join(buildguard.argv())
    assert f"exec {guard} /opt/x/bin/apptainer \"$@\" 2>&1" in shim.read_text()
    assert __import__("os").environ["PATH"] == before  # the user's PATH is untouched afterwards


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (lambda kw: None, "spython did not start a build"),
        (lambda kw: (kw["image"], stream(["FATAL: While performing build: exit status 3"], 255)),
         "apptainer build exited with code 255"),
        (lambda kw: (_ for _ in ()).throw(SystemExit(1)), "spython gave up"),
        (lambda kw: (kw["image"], stream(["INFO: done"], 0)), "wrote no image"),
    ],
)
def test_every_failure_is_a_build_error(monkeypatch: pytest.MonkeyPatch, recipe: Path, tmp_path: Path,
                                        behaviour: Any, reason: str) -> None:
    patch_build(monkeypatch, behaviour)
    with pytest.raises(BuildError) as info:
        app_builder.Apptainer("/usr/bin/apptainer").build(recipe, tmp_path / "out.sif", [], lambda _l: None)
    assert reason in str(info.value)
    if "255" in reason:
        assert "exit status 3" in info.value.log_tail
