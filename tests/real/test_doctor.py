"""`hpc-kernels doctor`: every check is made to fail for real (a PATH without Apptainer, an image
without ipykernel, a deleted image, a kernelspec off Jupyter's path...) and then seen to pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, registry
from hpc_kernels.doctor import base, hostchecks, kernelchecks

MakeRegistry = Callable[..., Path]
PY3_COMMAND = '[python3, -m, ipykernel_launcher, -f, "{connection_file}"]'


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """`hpc-kernels doctor --json ARGS` in-process: exit code and the parsed report."""
    capsys.readouterr()
    rc = cli.main(["doctor", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def findings(report: dict[str, Any], check: str, kernel: str | None = None) -> list[dict[str, Any]]:
    """The findings of one check (for one kernel)."""
    return [f for f in report["findings"]
            if f["check"] == check and (kernel is None or f["kernel"] == kernel)]


def one(report: dict[str, Any], check: str, kernel: str | None = None) -> dict[str, Any]:
    found = findings(report, check, kernel)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def on_path(apptainer_bin: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Apptainer first on PATH (as `module load apptainer` leaves it)."""
    monkeypatch.setenv("PATH", f"{Path(apptainer_bin).parent}{os.pathsep}{os.environ['PATH']}")
    return apptainer_bin


def base_registry(make_registry: MakeRegistry, base_sif: Path, extra: str = "",
                  command: str = PY3_COMMAND) -> Path:
    return make_registry(f"""
        kernels:
          base:
            image: {base_sif}
            command: {command}
        {extra}
        """)


# ----------------------------------------------------------------------------- runtime


def test_runtime_not_found_names_the_module(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a real PATH with no apptainer/singularity on it
    rc, report = run_doctor(capsys)
    finding = one(report, "runtime")
    assert rc == 1 and finding["status"] == "fail"
    assert "module load apptainer" in finding["fix"]


def test_runtime_off_path_is_the_one_recorded_at_install(tmp_path: Path, make_registry: MakeRegistry,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A JupyterHub session without 'module load apptainer': the kernels start through the Apptainer recorded
    at install time (the launcher's fallback), so doctor says that, and which one, instead of a failure."""
    cvmfs = fake_runtime(tmp_path, "apptainer version 1.4.5")
    image = tmp_path / "k.sif"
    image.write_text("an image")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n    command: {PY3_COMMAND}\n")
    monkeypatch.setenv("PATH", f"{cvmfs.parent}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["install", "--registry", str(path), "k"]) == 0
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    _rc, report = run_doctor(capsys, "--registry", str(path))
    finding = one(report, "runtime")
    assert finding["status"] == "ok", finding
    assert "no Apptainer on PATH" in finding["message"] and f"{cvmfs} (k)" in finding["message"]
    assert "'hpc-kernels build' needs it on PATH" in finding["message"]
    assert one(report, "runtime-version")["status"] == "ok"  # probed with the recorded one
    assert one(report, "ipykernel", "k")["status"] == "ok"  # so is the image (the stand-in says yes)
    # The recorded program gone too: then no kernel can start.
    cvmfs.unlink()
    rc, report = run_doctor(capsys, "--registry", str(path))
    finding = one(report, "runtime")
    assert rc == 1 and finding["status"] == "fail" and "recorded none that still exists" in finding["message"]
    probe = one(report, "ipykernel", "k")
    assert probe["status"] == "warn" and probe["message"].startswith("not checked: no Apptainer")


def fake_runtime(tmp_path: Path, banner: str) -> Path:
    """A program that answers `--version` like an old runtime (we cannot install Apptainer 1.0 here)."""
    prog = tmp_path / "old-bin" / "apptainer"
    prog.parent.mkdir(parents=True, exist_ok=True)
    prog.write_text(f"#!/bin/sh\necho '{banner}'\n")
    prog.chmod(0o755)
    return prog


@pytest.mark.parametrize(("banner", "status"), [
    ("apptainer version 1.0.3", "fail"),
    ("singularity version 3.5.3", "fail"),
    ("singularity-ce version 4.1.2", "warn"),
    ("apptainer version 1.1.0-rc.1", "ok"),
])
def test_runtime_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                         banner: str, status: str) -> None:
    monkeypatch.setenv("HPC_KERNELS_APPTAINER", str(fake_runtime(tmp_path, banner)))
    rc, report = run_doctor(capsys)
    finding = one(report, "runtime-version")
    assert finding["status"] == status, finding
    assert (rc == 1) == (status == "fail")


def test_real_apptainer_version_is_ok(on_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    _rc, report = run_doctor(capsys)
    assert one(report, "runtime")["status"] == "ok"
    assert one(report, "runtime-version")["status"] == "ok"


def test_parse_version() -> None:
    assert hostchecks.parse_version("apptainer version 1.4.5-2") == ("apptainer", (1, 4, 5))
    assert hostchecks.parse_version("singularity-ce version 4.1.0") == ("singularity-ce", (4, 1, 0))
    assert hostchecks.parse_version("nonsense") is None


# ----------------------------------------------------------------------------- builds


def recipe_registry(make_registry: MakeRegistry, fakeroot: bool = False) -> registry.Registry:
    path = make_registry(f"""
        kernels:
          sci:
            def: sci.def
            fakeroot: {str(fakeroot).lower()}
        """, {"sci.def": "Bootstrap: localimage\nFrom: base.sif\n%post\n  true\n"})
    return registry.load(path)


def test_build_namespaces_disabled(make_registry: MakeRegistry, tmp_path: Path) -> None:
    # Disabling user namespaces for real would break every other user of this machine: point the
    # check at a /proc copy that says what such a node says.
    proc = tmp_path / "proc"
    (proc / "sys/user").mkdir(parents=True)
    (proc / "sys/user/max_user_namespaces").write_text("0\n")
    ctx = base.Context(uid=1000, user="alice", proc_root=proc, etc_root=tmp_path / "etc")
    finding = hostchecks.check_build_namespaces(ctx, recipe_registry(make_registry).kernels)
    assert finding is not None and finding.status == "fail"
    assert "--slurm" in finding.fix


def test_fakeroot_without_subuid(make_registry: MakeRegistry, tmp_path: Path) -> None:
    proc, etc = tmp_path / "proc", tmp_path / "etc"
    (proc / "sys/user").mkdir(parents=True)
    (proc / "sys/user/max_user_namespaces").write_text("63000\n")
    etc.mkdir()
    (etc / "subuid").write_text("bob:100000:65536\n")
    entries = recipe_registry(make_registry, fakeroot=True).kernels
    ctx = base.Context(uid=1000, user="alice", proc_root=proc, etc_root=etc)
    finding = hostchecks.check_build_namespaces(ctx, entries)
    assert finding is not None and finding.status == "warn" and "alice" in finding.message
    (etc / "subuid").write_text("bob:100000:65536\nalice:165536:65536\n")
    finding = hostchecks.check_build_namespaces(ctx, entries)
    assert finding is not None and finding.status == "ok"


def test_subuid_file_that_is_not_utf8_is_read_not_a_traceback(make_registry: MakeRegistry, tmp_path: Path) -> None:
    proc, etc = tmp_path / "proc", tmp_path / "etc"
    (proc / "sys/user").mkdir(parents=True)
    (proc / "sys/user/max_user_namespaces").write_text("63000\n")
    etc.mkdir()
    # A site whose /etc/subuid holds a Latin-1 login name (byte 0xe9) on another line.
    (etc / "subuid").write_bytes(b"ren\xe9:100000:65536\nalice:165536:65536\n")
    ctx = base.Context(uid=1000, user="alice", proc_root=proc, etc_root=etc)
    finding = hostchecks.check_build_namespaces(ctx, recipe_registry(make_registry, fakeroot=True).kernels)
    assert finding is not None and finding.status == "ok"


def test_build_namespaces_on_this_node(make_registry: MakeRegistry) -> None:
    finding = hostchecks.check_build_namespaces(base.Context(), recipe_registry(make_registry).kernels)
    assert finding is not None and finding.status == "ok"


# ----------------------------------------------------------------------------- images


def test_image_missing_stale_and_deleted(make_registry: MakeRegistry, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from hpc_kernels.build import stamps

    reg = recipe_registry(make_registry)
    entry = reg.kernels[0]
    rc, report = run_doctor(capsys, "--registry", str(reg.path), "sci")
    assert rc == 1
    finding = one(report, "image", "sci")
    assert finding["status"] == "fail" and finding["fix"] == "hpc-kernels build sci"
    # An image recorded as built from another version of the recipe: stale.
    entry.image.parent.mkdir(parents=True, exist_ok=True)
    entry.image.write_bytes(b"not really a sif")
    stamps.stamp_path(entry.image).write_text(json.dumps({"digest": "an older recipe"}))
    _rc, report = run_doctor(capsys, "--registry", str(reg.path), "sci")
    assert one(report, "image", "sci")["status"] == "warn"
    # A registry naming an image file that was deleted.
    gone = tmp_path / "gone.sif"
    path = make_registry(f"kernels:\n  ext:\n    image: {gone}\n")
    rc, report = run_doctor(capsys, "--registry", str(path), "ext")
    assert rc == 1 and one(report, "image", "ext")["status"] == "fail"


# ----------------------------------------------------------------------------- ipykernel probe


@pytest.mark.apptainer
def test_python_missing_in_image(on_path: str, base_sif: Path, make_registry: MakeRegistry,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # A registry command that runs `python`; the test image (like many Debian images) has python3 only.
    path = base_registry(make_registry, base_sif, command='[python, -m, ipykernel_launcher, -f, "{connection_file}"]')
    rc, report = run_doctor(capsys, "--registry", str(path), "base")
    finding = one(report, "ipykernel", "base")
    assert rc == 1 and finding["status"] == "fail"
    assert "'python' does not exist" in finding["message"] and "python3" in finding["fix"]


@pytest.mark.apptainer
def test_without_a_command_the_python_of_the_image_is_probed(on_path: str, base_sif: Path,
                                                             make_registry: MakeRegistry,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # No `command:`: the default runs python3 (until `install` records the Python it finds in the image).
    path = make_registry(f"kernels:\n  base:\n    image: {base_sif}\n")
    _rc, report = run_doctor(capsys, "--registry", str(path), "base")
    finding = one(report, "ipykernel", "base")
    assert finding["status"] == "ok" and "python3" in finding["message"], finding


@pytest.mark.apptainer
def test_ipykernel_missing_in_image(on_path: str, base_sif: Path, make_registry: MakeRegistry,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty directory bound over the image's dist-packages: python3 is there, ipykernel is not.
    empty = tmp_path / "empty"
    empty.mkdir()
    path = make_registry(f"""
        kernels:
          bare:
            image: {base_sif}
            command: {PY3_COMMAND}
            binds: ["{empty}:/usr/lib/python3/dist-packages"]
        """)
    rc, report = run_doctor(capsys, "--registry", str(path), "bare")
    finding = one(report, "ipykernel", "bare")
    assert rc == 1 and finding["status"] == "fail"
    assert "No module named 'ipykernel'" in finding["message"]
    assert "%post" in finding["fix"]


@pytest.mark.apptainer
def test_missing_bind_source(on_path: str, base_sif: Path, make_registry: MakeRegistry, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    path = make_registry(f"""
        kernels:
          base:
            image: {base_sif}
            command: {PY3_COMMAND}
            binds: ["{data}:/data", "$HPCK_TEST_SCRATCH:/scratch"]
        """)
    monkeypatch.delenv("HPCK_TEST_SCRATCH", raising=False)
    rc, report = run_doctor(capsys, "--registry", str(path), "base")
    finding = one(report, "binds", "base")
    assert rc == 1 and finding["status"] == "fail"
    assert str(data) in finding["message"] and "$HPCK_TEST_SCRATCH" in finding["message"]
    # The probe still runs, without the missing binds, and says so (it is never skipped in silence).
    probe = one(report, "ipykernel", "base")
    assert probe["status"] == "ok" and "without the missing bind source(s)" in probe["message"], probe
    # What Apptainer itself says about such a bind: the kernel could not start.
    done = subprocess.run([on_path, "exec", "--bind", f"{data}:/data", str(base_sif), "true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "doesn't exist" in done.stderr
    data.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("HPCK_TEST_SCRATCH", str(scratch))
    rc, report = run_doctor(capsys, "--registry", str(path), "base")
    assert one(report, "binds", "base")["status"] == "ok"
    assert one(report, "ipykernel", "base")["status"] == "ok"


@pytest.mark.apptainer
def test_no_apptainer_on_path_but_installed_kernels_start(on_path: str, base_sif: Path, make_registry: MakeRegistry,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart's promise, for real: installed with Apptainer on PATH, checked in a session without it."""
    path = make_registry(f"kernels:\n  base:\n    image: {base_sif}\n")
    assert cli.main(["install", "--registry", str(path), "base"]) == 0
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc, report = run_doctor(capsys, "--registry", str(path))
    assert [f for f in report["findings"] if f["status"] == "fail"] == [] and rc == 0
    assert "no Apptainer on PATH, but the installed kernels start with" in one(report, "runtime")["message"]
    assert os.path.realpath(on_path) in os.path.realpath(one(report, "runtime")["message"].split(": ")[1].split(" (")[0])
    assert one(report, "ipykernel", "base")["status"] == "ok"


# ----------------------------------------------------------------------------- kernelspecs


@pytest.mark.apptainer
def test_healthy_kernel_passes(on_path: str, base_sif: Path, make_registry: MakeRegistry,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = base_registry(make_registry, base_sif)
    assert cli.main(["install", "--registry", str(path), "base"]) == 0
    rc, report = run_doctor(capsys, "--registry", str(path))
    assert [f for f in report["findings"] if f["status"] == "fail"] == []
    assert rc == 0 and report["ok"] is True
    assert one(report, "ipykernel", "base")["status"] == "ok"
    assert one(report, "kernelspec", "base")["status"] == "ok"
    assert one(report, "launcher", "base")["status"] == "ok"
    # The human rendering says the same.
    capsys.readouterr()
    assert cli.main(["doctor", "--registry", str(path), "base"]) == 0
    assert "base kernelspec: installed at" in capsys.readouterr().out


def test_kernelspec_off_jupyters_path(make_registry: MakeRegistry, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n")
    prefix = tmp_path / "group"
    assert cli.main(["install", "--registry", str(path), "--prefix", str(prefix), "k"]) == 0
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    finding = one(report, "kernelspec", "k")
    assert rc == 1 and finding["status"] == "fail"
    assert "JUPYTER_PATH" in finding["fix"] and "restart your JupyterLab session" in finding["fix"]
    from jupyter_core.paths import jupyter_data_dir

    assert str(Path(jupyter_data_dir()) / "kernels") in finding["message"]  # the searched dirs are shown
    # What `module load container-kernels` does: the prefix's share/jupyter on JUPYTER_PATH.
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    _rc, report = run_doctor(capsys, "--registry", str(path), "k")
    assert one(report, "kernelspec", "k")["status"] == "ok"


def test_kernelspec_not_ours_shadows(make_registry: MakeRegistry, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_core.paths import jupyter_data_dir

    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n")
    theirs = Path(jupyter_data_dir()) / "kernels" / "k"
    theirs.mkdir(parents=True)
    (theirs / "kernel.json").write_text(json.dumps({"argv": ["python", "-m", "ipykernel_launcher", "-f",
                                                             "{connection_file}"], "display_name": "k",
                                                    "language": "python"}))
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    assert rc == 1 and "not written by hpc-kernels" in one(report, "kernelspec", "k")["message"]


def test_disable_user_config_trap(make_registry: MakeRegistry, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n")
    assert cli.main(["install", "--registry", str(path), "k"]) == 0  # under $HOME
    _rc, report = run_doctor(capsys, "--registry", str(path), "k")
    assert one(report, "kernelspec", "k")["status"] == "ok"
    # JupyterHub's spawner exports this when `c.Spawner.disable_user_config = True`.
    monkeypatch.setenv("JUPYTERHUB_DISABLE_USER_CONFIG", "1")
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    finding = one(report, "kernelspec", "k")
    assert rc == 1 and "disable_user_config" in finding["message"] and "--prefix" in finding["fix"]
    # Seen in a config file too.
    monkeypatch.delenv("JUPYTERHUB_DISABLE_USER_CONFIG")
    etc = tmp_path / "etc"
    (etc / "jupyterhub").mkdir(parents=True)
    (etc / "jupyterhub" / "jupyterhub_config.py").write_text("c.Spawner.disable_user_config = True\n")
    assert kernelchecks.disable_user_config_source(base.Context(etc_root=etc)) == str(
        etc / "jupyterhub" / "jupyterhub_config.py")


def installed_kernel(make_registry: MakeRegistry, tmp_path: Path) -> tuple[Path, Path, Path]:
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n")
    assert cli.main(["install", "--registry", str(path), "k"]) == 0
    from hpc_kernels import specdirs

    kdir = specdirs.visible("k")
    assert kdir is not None
    return path, image, kdir


def test_launcher_python_gone_or_without_us(make_registry: MakeRegistry, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, _image, kdir = installed_kernel(make_registry, tmp_path)
    spec_file = kdir / "kernel.json"
    data = json.loads(spec_file.read_text())
    data["argv"][0] = str(tmp_path / "deleted-venv" / "bin" / "python")
    spec_file.write_text(json.dumps(data))
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    bad = [f for f in findings(report, "launcher", "k") if f["status"] == "fail"]
    assert rc == 1 and bad and "does not exist any more" in bad[0]["message"]
    # A Python that exists, but the launcher script is gone (hpc-kernels removed from that environment).
    data["argv"][0] = sys.executable
    data["argv"][3] = str(tmp_path / "removed" / "hpc_kernels" / "launch.py")
    spec_file.write_text(json.dumps(data))
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    bad = [f for f in findings(report, "launcher", "k") if f["status"] == "fail"]
    assert rc == 1 and bad and "does not start" in bad[0]["message"] and "can't open file" in bad[0]["message"]
    # A kernelspec of an earlier version (python -I -m hpc_kernels.launch) run by a Python without our package.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    data["argv"][:4] = [str(venv / "bin" / "python"), "-I", "-m", "hpc_kernels.launch"]
    spec_file.write_text(json.dumps(data))
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    bad = [f for f in findings(report, "launcher", "k") if f["status"] == "fail"]
    assert rc == 1 and bad and "No module named 'hpc_kernels'" in bad[0]["message"]


def test_kernelspec_pointing_at_deleted_image(make_registry: MakeRegistry, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, image, _kdir = installed_kernel(make_registry, tmp_path)
    image.unlink()
    path.unlink()  # the registry is gone too: doctor still checks the kernelspecs it finds
    rc, report = run_doctor(capsys)
    bad = [f for f in findings(report, "launcher", "k") if f["status"] == "fail"]
    assert rc == 1 and bad and str(image) in bad[0]["message"]
    assert one(report, "registry")["status"] == "warn"


def test_installed_spec_differs_from_registry(make_registry: MakeRegistry, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, image, _kdir = installed_kernel(make_registry, tmp_path)
    path.write_text(f"kernels:\n  k:\n    image: {image}\n    binds: [/project]\n")
    _rc, report = run_doctor(capsys, "--registry", str(path), "k")
    drift = [f for f in findings(report, "launcher", "k") if f["status"] == "warn"]
    assert drift and "binds" in drift[0]["message"] and drift[0]["fix"] == "hpc-kernels install k"


# ----------------------------------------------------------------------------- environment


def test_environment_leaks(monkeypatch: pytest.MonkeyPatch, isolated_home: Path, make_registry: MakeRegistry,
                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rc, report = run_doctor(capsys)
    assert [f["status"] for f in findings(report, "environment")] == ["ok"]
    monkeypatch.setenv("PYTHONPATH", "/cvmfs/soft.computecanada.ca/easybuild/python/site-packages")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/cvmfs/lib")
    site = isolated_home / ".local/lib/python3.11/site-packages/numpy"
    site.mkdir(parents=True)
    _rc, report = run_doctor(capsys)
    messages = " ".join(f["message"] for f in findings(report, "environment") if f["status"] == "warn")
    assert "PYTHONPATH is set" in messages and "LD_LIBRARY_PATH is set" in messages
    assert ".local/lib/python3.11/site-packages" in messages
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n    pass_env: [LD_*, OMP_NUM_THREADS]\n")
    _rc, report = run_doctor(capsys, "--registry", str(path), "k")
    finding = one(report, "kernel-env", "k")
    assert finding["status"] == "warn" and "LD_LIBRARY_PATH" in finding["message"]


# ----------------------------------------------------------------------------- node


def test_login_node_by_name() -> None:
    for name in ("login1", "gra-login2", "narval3", "rorqual1"):
        assert hostchecks.check_login_node(base.Context(environ={}, hostname=name)).status == "warn", name
    for name in ("nc10101", "fc30105", "vm", "laptop"):
        assert hostchecks.check_login_node(base.Context(environ={}, hostname=name)).status == "ok", name
    in_job = hostchecks.check_login_node(base.Context(environ={"SLURM_JOB_ID": "42"}, hostname="login1"))
    assert in_job.status == "ok" and "42" in in_job.message


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for unshare --uts")
def test_login_node_for_real(tmp_path: Path) -> None:
    # A private UTS namespace whose host name really is login1: the CLI sees it through gethostname().
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    code = "import sys; from hpc_kernels.cli import main; sys.exit(main(['doctor', '--json']))"
    done = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname login1 && exec "$0" -c "$1"',
                           sys.executable, code], env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    finding = one(report, "login-node")
    assert finding["status"] == "warn" and "login1" in finding["message"]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"),
                    reason="this node has an NVIDIA GPU")
def test_gpu_requested_but_absent(make_registry: MakeRegistry, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n    gpu: nvidia\n  a:\n    image: {image}\n")
    _rc, report = run_doctor(capsys, "--registry", str(path))
    assert one(report, "gpu", "k")["status"] == "warn"  # not in a job: maybe a login node
    assert findings(report, "gpu", "a") == []  # gpu: auto asks for nothing
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # inside a job, the job itself lacks the GPU
    rc, report = run_doctor(capsys, "--registry", str(path), "k")
    assert rc == 1 and one(report, "gpu", "k")["status"] == "fail"


def test_unknown_kernel_and_missing_registry(capsys: pytest.CaptureFixture[str], make_registry: MakeRegistry,
                                             tmp_path: Path) -> None:
    assert cli.main(["doctor", "nothere"]) == 1  # no registry at all and a name asked for
    assert "no registry found" in capsys.readouterr().err
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  k:\n    image: {image}\n")
    assert cli.main(["doctor", "--registry", str(path), "nothere"]) == 1
    assert "no kernel named 'nothere'" in capsys.readouterr().err


def test_unwritable_state_and_runtime_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_doctor(capsys)
    assert one(report, "state-dirs")["status"] == "ok"
    blocker = tmp_path / "read-only-home"  # a file where a directory must be: unwritable even for root
    blocker.write_text("")
    monkeypatch.setenv("HPC_KERNELS_STATE", str(blocker / "state"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(blocker / "runtime"))
    rc, report = run_doctor(capsys)
    runtime, state = sorted(findings(report, "state-dirs"), key=lambda f: "Jupyter's runtime" not in f["message"])
    assert rc == 1 and state["status"] == runtime["status"] == "fail"
    assert f"{blocker / 'runtime'} cannot be created: {blocker} is not a directory" in runtime["message"]
    assert "JUPYTER_RUNTIME_DIR" in runtime["fix"]
    assert f"{blocker / 'state'} cannot be created" in state["message"] and "HPC_KERNELS_STATE" in state["fix"]
    # A directory without write permission (what a read-only home is for a user).
    locked_dir = tmp_path / "locked"
    locked_dir.mkdir()
    monkeypatch.setenv("HPC_KERNELS_STATE", str(locked_dir))
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked_dir))
    assert any("is not writable" in f["message"] for f in findings(run_doctor(capsys)[1], "state-dirs"))
