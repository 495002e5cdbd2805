"""What the CLI prints for people: nothing a user must copy is cut, one kernel name in one visible place,
and no silent or misleading lines (issue #13: first contact, two install locations, unreadable output)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli

LONG = "science-with-a-rather-long-kernel-name"
RECIPE = {"sci.def": "Bootstrap: localimage\nFrom: base.sif\n"}
REGISTRY = f"kernels:\n  sci:\n    def: sci.def\n  {LONG}:\n    def: sci.def\n"


@pytest.fixture
def reg(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> Path:
    """A registry of two kernels, both installed in the user's Jupyter directory."""
    path: Path = make_registry(REGISTRY, RECIPE)
    assert cli.main(["install", "--all", "--registry", str(path)]) == 0
    capsys.readouterr()
    return path


def test_permission_errors_name_the_full_path(reg: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    """rmtree reports a bare 'kernel.json'; the user needs to know which directory is not writable.

    As root (CI) permissions cannot be denied for real, so unlink fails as it does for a user whose
    kernels directory is read-only: relative to the directory's file descriptor.
    """
    real_unlink = os.unlink

    def denied(path: Any, *args: Any, dir_fd: int | None = None) -> None:
        if str(path) == "kernel.json":
            raise PermissionError(13, "Permission denied", path)
        real_unlink(path, *args, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", denied)
    spec = isolated_home / ".local/share/jupyter/kernels/sci/kernel.json"
    for argv in (["uninstall", "sci"], ["install", "sci", "--registry", str(reg)]):
        assert cli.main(argv) == 1
        assert f"Permission denied ({spec})." in capsys.readouterr().err, argv
