"""The CLI: clear one-sentence errors with the right exit codes, JSON output, ownership rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import hpc_kernels.launch
from hpc_kernels import cli

RECIPE = {"sci.def": "Bootstrap: localimage\nFrom: base.sif\n"}
REGISTRY = "defaults:\n  images_dir: images\nkernels:\n  sci:\n    def: sci.def\n    display_name: Science\n"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_clean_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("hpc-kernels ")
    out = run_cli("--help").stdout
    for command in cli.COMMANDS:
        assert command in out


def test_unknown_kernel(make_registry: Any) -> None:
    path = make_registry(REGISTRY, RECIPE)
    assert_clean_error(run_cli("install", "nope", "--registry", str(path)), 1, "no kernel named 'nope'", "known: sci")


def test_malformed_registry_names_file_and_line(make_registry: Any) -> None:
    path = make_registry("kernels:\n  sci:\n    def: missing.def\n")
    done = run_cli("list", "--registry", str(path))
    assert_clean_error(done, 1, f"{path}:3: recipe 'missing.def'")


def test_bad_flag_and_missing_names_are_usage_errors(make_registry: Any) -> None:
    path = make_registry(REGISTRY, RECIPE)
    assert_clean_error(run_cli("build", "--frobnicate"), 2, "unrecognized arguments")
    assert_clean_error(run_cli("build", "--registry", str(path)), 2, "name at least one kernel")
    assert_clean_error(run_cli("install", "sci", "--all", "--registry", str(path)), 2, "not both")


def test_no_registry_anywhere() -> None:
    assert_clean_error(run_cli("list"), 1, "no registry found", "--registry PATH")


def test_missing_runtime_for_build(make_registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_registry(REGISTRY, RECIPE)
    monkeypatch.setenv("PATH", "/nonexistent")
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "build", "sci", "--registry", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert_clean_error(done, 1, "module load apptainer")
    assert not (path.parent / "images" / "sci.sif").exists()


def test_install_list_show_uninstall(make_registry: Any, isolated_home: Path) -> None:
    path = make_registry(REGISTRY, RECIPE)
    done = run_cli("install", "sci", "--registry", str(path))
    assert done.returncode == 0, done.stderr
    spec_dir = isolated_home / ".local/share/jupyter/kernels/sci"
    data = json.loads((spec_dir / "kernel.json").read_text())
    launcher = str(Path(hpc_kernels.launch.__file__).absolute())
    assert data["argv"] == [sys.executable, "-I", "-S", launcher, str(spec_dir / "kernel.json"), "{connection_file}"]
    assert data["display_name"] == "Science"
    assert data["metadata"]["hpc_kernels"]["image"] == str(path.parent / "images/sci.sif")
    assert "does not exist yet" in done.stderr
    listing = json.loads(run_cli("list", "--json", "--registry", str(path)).stdout)
    assert listing["found_via"] == "--registry"
    row = listing["kernels"][0]
    assert (row["kernel"], row["image_state"], row["installed"]) == ("sci", "missing", str(spec_dir))
    shown = json.loads(run_cli("show", "sci", "--json", "--registry", str(path)).stdout)
    assert shown["kernel_json"] == data
    assert run_cli("uninstall", "sci").returncode == 0
    assert not spec_dir.exists()


def test_install_prefix(make_registry: Any, tmp_path: Path) -> None:
    path = make_registry(REGISTRY, RECIPE)
    assert run_cli("install", "--all", "--prefix", str(tmp_path / "pfx"), "--registry", str(path)).returncode == 0
    assert (tmp_path / "pfx/share/jupyter/kernels/sci/kernel.json").is_file()


def test_never_overwrites_or_removes_a_foreign_kernelspec(make_registry: Any, isolated_home: Path) -> None:
    path = make_registry(REGISTRY, RECIPE)
    foreign = isolated_home / ".local/share/jupyter/kernels/sci"
    foreign.mkdir(parents=True)
    (foreign / "kernel.json").write_text('{"argv": ["python"], "display_name": "mine", "language": "python"}')
    assert_clean_error(run_cli("install", "sci", "--registry", str(path)), 1, "was not written by hpc-kernels")
    assert_clean_error(run_cli("uninstall", "sci"), 1, "was not written by hpc-kernels")
    assert json.loads((foreign / "kernel.json").read_text())["display_name"] == "mine"


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, make_registry: Any) -> None:
    from hpc_kernels.commands import list as list_cmd

    def boom(_args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(list_cmd, "run", boom)
    assert cli.main(["list"]) == 130


def test_unwritable_images_dir_is_one_sentence(make_registry: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the images directory should be")
    path = make_registry(f"defaults:\n  images_dir: {blocker}/images\nkernels:\n  sci:\n    def: sci.def\n", RECIPE)
    done = run_cli("build", "sci", "--registry", str(path))
    assert_clean_error(done, 1, "Not a directory")


def test_show_of_an_instance_kernel_names_the_instance(make_registry: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "apptainer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    path = make_registry(REGISTRY.replace("display_name: Science", "display_name: Science\n    mode: instance"), RECIPE)
    shown = json.loads(run_cli("show", "sci", "--json", "--registry", str(path)).stdout)
    assert "hpc-kernels build sci" in shown["problem"]
    (path.parent / "images").mkdir()
    (path.parent / "images" / "sci.sif").write_text("an image")
    shown = json.loads(run_cli("show", "sci", "--json", "--registry", str(path)).stdout)
    assert shown["kernel_json"]["interrupt_mode"] == "message"
    assert shown["problem"] is None
    assert shown["command"][:6] == [str(fake), "-q", "exec", "--cleanenv", "--no-eval", shown["command"][5]]
    assert shown["command"][5].startswith("instance://hpck-sci-")
    assert any("instance start" in w for w in shown["warnings"])


@pytest.mark.parametrize("command", [["list"], ["build", "--all"], ["install", "--all"], ["show", "sci"]])
def test_a_registry_that_is_not_text_is_an_error_not_a_traceback(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_bytes("kernels:\n  sci:\n    display_name: Caf\xe9\n".encode("latin-1"))
    assert_clean_error(run_cli(*command, "--registry", str(path)), 1, f"{path}:3: not UTF-8 text")


def test_doctor_reports_a_registry_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_bytes(b"\x00\x01\x02\xff\xfe binary\n")
    done = run_cli("doctor", "--json", "--registry", str(path))
    assert "Traceback" not in done.stderr
    registry_findings = [f for f in json.loads(done.stdout)["findings"] if f["check"] == "registry"]
    assert "looks like a binary file" in registry_findings[0]["message"]


def test_a_filesystem_error_in_our_state_directory_names_it(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from hpc_kernels import paths
    from hpc_kernels.runtimes.apptainer import status as app_status

    def denied(problems: object = None) -> list[object]:
        raise PermissionError(errno.EACCES, "Permission denied", str(paths.host_state_dir() / "instances"))

    monkeypatch.setattr(app_status, "list_instances", denied)
    assert cli.main(["instances"]) == 1
    err = capsys.readouterr().err
    assert f"hpc-kernels cannot write its state directory {paths.state_dir()} (Permission denied: " in err
    assert "HPC_KERNELS_STATE" in err
