"""What the CLI prints for people: nothing a user must copy is cut, one kernel name in one visible place,
and no silent or misleading lines (issue #13: first contact, two install locations, unreadable output)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, gc, locks, slurm_records
from hpc_kernels.build import orchestrator
from hpc_kernels.runtimes.apptainer import status as app_status
from tests.helpers.builders import FakeBuilder

LONG = "science-with-a-rather-long-kernel-name"
RECIPE = {"sci.def": "Bootstrap: localimage\nFrom: base.sif\n"}
REGISTRY = f"kernels:\n  sci:\n    def: sci.def\n  {LONG}:\n    def: sci.def\n"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def out_err(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return ANSI.sub("", captured.out), ANSI.sub("", captured.err)


def as_terminal(monkeypatch: pytest.MonkeyPatch, columns: int = 80) -> None:
    """Make rich treat the captured stdout/stderr as an 80-column terminal."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", str(columns))


@pytest.fixture
def reg(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> Path:
    """A registry of two kernels, both installed in the user's Jupyter directory."""
    path: Path = make_registry(REGISTRY, RECIPE)
    assert cli.main(["install", "--all", "--registry", str(path)]) == 0
    capsys.readouterr()
    return path


# ----------------------------------------------------------------------------- listings


def test_list_piped_is_one_whole_line_per_kernel(reg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`list | grep NAME` finds the kernel's whole row: its name, image and kernelspec path, home as ~."""
    assert cli.main(["list", "--registry", str(reg)]) == 0
    out, err = out_err(capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["kernel", "runtime/mode", "image", "state", "installed"]
    [row] = [line for line in lines if line.startswith(LONG)]
    assert row.split() == [LONG, "apptainer/exec", f"~/.local/share/hpc-kernels/images/{LONG}.sif", "missing",
                           f"~/.local/share/jupyter/kernels/{LONG}"]
    assert len(lines) == 3 and "│" not in out
    assert f"{reg} (found via --registry)" in err  # the title goes to stderr: stdout is rows only


def test_list_in_a_narrow_terminal_keeps_paths_whole(reg: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    as_terminal(monkeypatch)
    assert cli.main(["list", "--registry", str(reg)]) == 0
    out, _err = out_err(capsys)
    assert "│" not in out and "…" not in out
    lines = [line.strip() for line in out.splitlines()]
    # Too wide for 80 columns: each path on a line of its own, whole, after the kernel's short columns.
    at = lines.index(f"{LONG}  apptainer/exec  missing")
    assert lines[at + 1] == f"image:     ~/.local/share/hpc-kernels/images/{LONG}.sif"
    assert lines[at + 2] == f"installed: ~/.local/share/jupyter/kernels/{LONG}"


def test_list_in_a_wide_terminal_is_one_line_per_kernel(reg: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    as_terminal(monkeypatch, columns=300)
    assert cli.main(["list", "--registry", str(reg)]) == 0
    out, _err = out_err(capsys)
    rows = [line.split() for line in out.splitlines() if line.startswith(LONG)]
    assert rows == [[LONG, "apptainer/exec", f"~/.local/share/hpc-kernels/images/{LONG}.sif", "missing",
                     f"~/.local/share/jupyter/kernels/{LONG}"]]


def test_list_json_keeps_full_paths(reg: Path, capsys: pytest.CaptureFixture[str], isolated_home: Path) -> None:
    assert cli.main(["list", "--json", "--registry", str(reg)]) == 0
    row = json.loads(capsys.readouterr().out)["kernels"][1]
    assert row["installed"] == str(isolated_home / ".local/share/jupyter/kernels" / LONG)
    assert row["image"] == str(isolated_home / ".local/share/hpc-kernels/images" / f"{LONG}.sif")
    assert row["shadowed"] == []


def test_instances_names_are_whole(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   isolated_home: Path) -> None:
    """The instance name is what `hpc-kernels stop` needs: never cut, piped or in a narrow terminal."""
    name = f"hpck-{LONG}-alice-node-1-j123456-0123456789abcdef"
    image = str(isolated_home / "images" / f"{LONG}.sif")
    found = [app_status.InstanceStatus(name, LONG, image, "running", 42, 2, time.time(), None, 600.0, True),
             app_status.InstanceStatus(name + "x", LONG, image, "dead", 43, 0, time.time(), time.time(), 600.0,
                                      False)]
    monkeypatch.setattr(app_status, "list_instances", lambda: found)
    assert cli.main(["instances"]) == 0
    out, _err = out_err(capsys)
    rows = [line for line in out.splitlines() if line.startswith(name)]
    assert rows[0].split()[:4] == [name, LONG, f"~/images/{LONG}.sif", "running"]
    assert rows[1].split()[:4] == [name + "x", LONG, f"~/images/{LONG}.sif", "dead"]
    as_terminal(monkeypatch)
    assert cli.main(["instances"]) == 0
    out, _err = out_err(capsys)
    assert "│" not in out and "…" not in out
    assert [name, LONG, "running", "2", "—"] in [line.split() for line in out.splitlines()]
    assert f"image: ~/images/{LONG}.sif" in out


def test_jobs_log_paths_and_states_are_whole(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             isolated_home: Path) -> None:
    log = isolated_home / ".local/state/hpc-kernels/jobs/logs" / "build-1234567_1.out"
    rows = [slurm_records.TaskStatus("1234567", "1234567_1", "build", LONG, "PENDING", reason="Priority",
                             log=str(log), submitted_at=time.time()),
            slurm_records.TaskStatus("1234568", "1234568", "install", LONG, "COMPLETED", log=str(log))]
    monkeypatch.setattr(slurm_records, "load_records", lambda: ["a record"])
    monkeypatch.setattr(slurm_records, "statuses", lambda records: rows)
    assert cli.main(["jobs"]) == 0
    out, _err = out_err(capsys)
    [pending] = [line for line in out.splitlines() if line.startswith("1234567_1")]
    assert pending.split()[1:5] == ["build", LONG, "PENDING", "(Priority)"]
    assert pending.endswith("~/.local/state/hpc-kernels/jobs/logs/build-1234567_1.out")
    as_terminal(monkeypatch)
    assert cli.main(["jobs"]) == 0
    out, _err = out_err(capsys)
    assert "│" not in out and "…" not in out and "PENDING (Priority)" in out
    assert "log: ~/.local/state/hpc-kernels/jobs/logs/build-1234567_1.out" in out


# ----------------------------------------------------------------------------- two install locations


@pytest.fixture
def group(reg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """'sci' also installed in a module prefix that is on JUPYTER_PATH, as 'module load' leaves it."""
    prefix = tmp_path / "grp"
    assert cli.main(["install", "sci", "--prefix", str(prefix), "--registry", str(reg)]) == 0
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share/jupyter"))
    capsys.readouterr()
    return prefix


def test_install_refuses_a_copy_jupyter_would_hide(reg: Path, group: Path, isolated_home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    user_copy = isolated_home / ".local/share/jupyter/kernels/sci"
    assert cli.main(["uninstall", "sci"]) == 0  # start with the module's copy only
    capsys.readouterr()
    assert cli.main(["install", "sci", "--registry", str(reg)]) == 1
    err = capsys.readouterr().err
    assert "would be hidden" in err and str(group / "share/jupyter/kernels/sci") in err
    assert f"'hpc-kernels install sci --prefix {group}'" in err and "--user" in err
    assert not user_copy.exists()
    # Asked for explicitly, the hidden copy is written, and the output says Jupyter does not use it.
    assert cli.main(["install", "sci", "--user", "--registry", str(reg)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert user_copy.is_file() or (user_copy / "kernel.json").is_file()
    assert f"Jupyter uses the 'sci' in {group}/share/jupyter/kernels/sci" in err and "hidden" in err
    # Updating the copy Jupyter uses is fine.
    assert cli.main(["install", "sci", "--prefix", str(group), "--registry", str(reg)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "this copy hides the 'sci' in ~/.local/share/jupyter/kernels/sci" in err
    assert "'hpc-kernels uninstall sci --user' removes it" in err


def test_list_and_doctor_name_the_hidden_copy(reg: Path, group: Path, isolated_home: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    user_copy = isolated_home / ".local/share/jupyter/kernels/sci"
    assert cli.main(["list", "--json", "--registry", str(reg)]) == 0
    row = json.loads(capsys.readouterr().out)["kernels"][0]
    assert row["installed"] == str(group / "share/jupyter/kernels/sci")
    assert row["shadowed"] == [str(user_copy)]
    assert cli.main(["list", "--registry", str(reg)]) == 0
    out, err = out_err(capsys)
    assert f"{group}/share/jupyter/kernels/sci" in out.splitlines()[1]
    assert "~/.local/share/jupyter/kernels/sci" in " ".join(err.split())
    assert "'hpc-kernels uninstall sci --user'" in " ".join(err.split())

    assert cli.main(["doctor", "sci", "--json", "--registry", str(reg)]) in (0, 1)
    findings = json.loads(capsys.readouterr().out)["findings"]
    [spec] = [f for f in findings if f["check"] == "kernelspec"]
    assert spec["status"] == "warn" and str(user_copy) in spec["message"]
    assert str(group / "share/jupyter/kernels/sci") in spec["message"]
    assert "hpc-kernels uninstall sci --user" in spec["fix"]


def test_install_into_a_prefix_jupyter_does_not_search_says_so(reg: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", "sci", "--prefix", str(tmp_path / "pfx"), "--registry", str(reg)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path}/pfx/share/jupyter is not on Jupyter's search path (for now it uses the 'sci' in " \
           "~/.local/share/jupyter/kernels/sci): add it to JUPYTER_PATH" in err


def test_uninstall_says_what_remains_in_the_menu(reg: Path, group: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["uninstall", "sci"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "removed kernelspec 'sci'" in err
    assert f"'sci' is still in Jupyter's kernel menu: it now uses the copy in {group}/share/jupyter/kernels/sci" \
        in err
    assert f"'hpc-kernels uninstall sci --prefix {group}' removes it" in err
    # Nothing left in the user dir: the error names where Jupyter finds it instead.
    assert cli.main(["uninstall", "sci"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"Jupyter finds one in {group}/share/jupyter/kernels/sci" in err
    assert f"'hpc-kernels uninstall sci --prefix {group}' removes it" in err


# ----------------------------------------------------------------------------- small ones


def test_gc_dry_run_says_what_it_would_do(reg: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the kernelspec sweeper (the images of both kernels are missing): no runtime needed.
    monkeypatch.setattr(gc, "sweep", lambda dry_run=False, registry=None: gc.sweep_kernelspecs(dry_run))
    assert cli.main(["gc", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "kernelspecs: sci: would remove (its image" in err
    assert "✓" not in err and "would have" not in err and "nothing was changed" in err
    assert cli.main(["gc"]) == 0
    assert "✓ kernelspecs: sci: removed (its image" in capsys.readouterr().err


def test_uninstall_all_with_nothing_to_do_says_so(capsys: pytest.CaptureFixture[str], isolated_home: Path) -> None:
    assert cli.main(["uninstall", "--all"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing to remove: no kernelspecs of hpc-kernels in ~/.local/share/jupyter/kernels" in err


def test_an_empty_registry_says_where_to_add_a_kernel(make_registry: Any, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    path = make_registry("kernels: {}\n")
    module = ["module", "install", "--all", "--dir", str(tmp_path / "mf"), "--prefix", str(tmp_path / "pfx")]
    for argv in (["list"], ["build", "--all"], ["install", "--all"], module):
        assert cli.main([*argv, "--registry", str(path)]) == 0, argv
        out, err = out_err(capsys)
        assert out == "" and f"no kernels in {path}: add one under 'kernels:'" in " ".join(err.split()), argv


def test_build_results_have_no_blank_lines_when_piped(reg: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrator, "default_builder", lambda entry: FakeBuilder())
    assert cli.main(["build", "--all", "--registry", str(reg)]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["✓ sci", f"✓ {LONG}"], err
    assert f"built ~/.local/share/hpc-kernels/images/{LONG}.sif" in lines[1]


def test_build_progress_shows_the_whole_kernel_name(reg: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrator, "default_builder", lambda entry: FakeBuilder(delay=0.3))
    as_terminal(monkeypatch)
    assert cli.main(["build", LONG, "--registry", str(reg)]) == 0
    _out, err = out_err(capsys)
    frames = [f for f in err.replace("\r", "\n").splitlines() if "Running post scriptlet" in f]
    assert frames, err
    assert all(f"{LONG} " in f for f in frames), frames


def test_a_build_that_waits_for_another_says_so_when_piped(reg: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           isolated_home: Path) -> None:
    monkeypatch.setattr(orchestrator, "default_builder", lambda entry: FakeBuilder())
    lock = orchestrator.lock_path(isolated_home / ".local/share/hpc-kernels/images/sci.sif")
    held, release = threading.Event(), threading.Event()

    def other_build() -> None:
        with locks.cluster_lock(lock):
            held.set()
            release.wait(10)

    other = threading.Thread(target=other_build)
    other.start()
    assert held.wait(10)
    threading.Timer(0.5, release.set).start()
    try:
        assert cli.main(["build", "sci", "--registry", str(reg)]) == 0
    finally:
        release.set()
        other.join(10)
    err = capsys.readouterr().err
    assert "sci: waiting for another build of 'sci' to finish" in err
    assert "✓ sci: built" in err


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
