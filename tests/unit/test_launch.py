"""The launcher's apptainer command line: exact argv, clean environment, GPU flags, runtime resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.apptainer import cli as apptainer

SPEC = LaunchSpec(
    kernel="sci", runtime="apptainer", mode="exec", image="/img/sci.sif",
    command=("python", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
    binds=("/project", "/scratch:/scratch:ro"), env=(("OMP_NUM_THREADS", "4"),), pass_env=("MY_*",),
    gpu="auto", runtime_args=("--contain",),
)


def no_devices(_path: str) -> bool:
    return False


def test_exact_argv() -> None:
    argv, _env, warnings = apptainer.exec_command(SPEC, "/run/user/1/kernel-1.json", "/usr/bin/apptainer", {}, no_devices)
    assert argv == [
        "/usr/bin/apptainer", "-q", "exec", "--cleanenv", "--no-eval",
        "--bind", f"/run/user/1/kernel-1.json:{apptainer.CONNECTION_DST}:rw",
        "--bind", "/project", "--bind", "/scratch:/scratch:ro",
        "--contain", "/img/sci.sif",
        "python", "-m", "ipykernel_launcher", "-f", apptainer.CONNECTION_DST,
    ]
    assert warnings == []


def test_connection_file_with_spaces_stays_one_argument() -> None:
    argv, _, _ = apptainer.exec_command(SPEC, "/home/a b/kernel 1.json", "apptainer", {}, no_devices)
    assert f"/home/a b/kernel 1.json:{apptainer.CONNECTION_DST}:rw" in argv


def test_clean_environment_allowlist() -> None:
    host = {
        "PATH": "/usr/bin", "PYTHONPATH": "/leak", "LD_LIBRARY_PATH": "/leak", "LD_PRELOAD": "x.so",
        "SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0", "MY_VAR": "yes", "OTHER": "no",
        "APPTAINERENV_SNEAKY": "1", "APPTAINER_BIND": "/project", "SLURM_TMPDIR": "/localscratch/j42",
    }
    argv, env, _ = apptainer.exec_command(SPEC, "/c.json", "/opt/bin/apptainer", host, no_devices)
    inside = {k[len("APPTAINERENV_"):]: v for k, v in env.items() if k.startswith("APPTAINERENV_")}
    assert inside == {
        "SLURM_JOB_ID": "42", "SLURM_TMPDIR": "/localscratch/j42", "CUDA_VISIBLE_DEVICES": "0",
        "MY_VAR": "yes", "OMP_NUM_THREADS": "4", "PYTHONNOUSERSITE": "1",
    }
    # the runtime itself keeps the host environment (and DRAC's APPTAINER_BIND) to find its own files
    assert env["PATH"] == "/usr/bin" and env["APPTAINER_BIND"] == "/project"
    assert argv[5:7] == ["-W", "/localscratch/j42"]


def test_singularity_gets_its_own_prefix() -> None:
    _, env, _ = apptainer.exec_command(SPEC, "/c.json", "/usr/bin/singularity", {}, no_devices)
    assert env["SINGULARITYENV_PYTHONNOUSERSITE"] == "1"


@pytest.mark.parametrize(
    ("gpu", "devices", "flag", "warns"),
    [
        ("auto", set(), None, False),
        ("auto", {"/dev/nvidiactl"}, "--nv", False),
        ("auto", {"/dev/kfd"}, "--rocm", False),
        ("nvidia", set(), None, True),
        ("nvidia", {"/dev/nvidia0"}, "--nv", False),
        ("rocm", {"/dev/nvidia0"}, None, True),
        ("none", {"/dev/nvidiactl"}, None, False),
    ],
)
def test_gpu_flags_decided_on_the_node(gpu: str, devices: set[str], flag: str | None, warns: bool) -> None:
    got_flag, warning = apptainer.gpu_flag(gpu, devices.__contains__)
    assert got_flag == flag
    assert bool(warning) == warns


def test_find_binary_prefers_apptainer_then_singularity(tmp_path: Path) -> None:
    for name in ("apptainer", "singularity"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert apptainer.find_binary({"PATH": str(tmp_path)}) == str(tmp_path / "apptainer")
    (tmp_path / "apptainer").unlink()
    assert apptainer.find_binary({"PATH": str(tmp_path)}) == str(tmp_path / "singularity")
    (tmp_path / "singularity").unlink()
    with pytest.raises(Exception, match="module load apptainer"):
        apptainer.find_binary({"PATH": str(tmp_path)})


def test_launcher_without_runtime_explains_the_fix(tmp_path: Path) -> None:
    image = tmp_path / "x.sif"
    image.write_text("")
    spec_file = tmp_path / "kernel.json"
    spec = LaunchSpec(kernel="x", runtime="apptainer", mode="exec", image=str(image), command=SPEC.command)
    spec_file.write_text(json.dumps({"argv": [], "metadata": {"hpc_kernels": spec.to_json()}}))
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "hpc_kernels.launch", str(spec_file), "/c.json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "module load apptainer" in done.stderr and "Traceback" not in done.stderr


def test_launcher_with_missing_image_says_build_it(tmp_path: Path) -> None:
    spec = LaunchSpec(kernel="x", runtime="apptainer", mode="exec", image=str(tmp_path / "gone.sif"),
                      command=SPEC.command)
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"metadata": {"hpc_kernels": spec.to_json()}}))
    done = subprocess.run([sys.executable, "-m", "hpc_kernels.launch", str(spec_file), "/c.json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "hpc-kernels build x" in done.stderr and "Traceback" not in done.stderr


def test_launcher_rejects_a_foreign_kernel_json(tmp_path: Path) -> None:
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"argv": ["python"], "metadata": {}}))
    done = subprocess.run([sys.executable, "-m", "hpc_kernels.launch", str(spec_file), "/c.json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "was not written by hpc-kernels" in done.stderr
    assert "Traceback" not in done.stderr


def test_launcher_argv_is_immune_to_pythonpath(tmp_path: Path) -> None:
    """A PYTHONPATH or user site from the server's environment cannot shadow the launcher: the kernelspec's
    own argv (python -I -S .../launch.py) runs it, from another directory."""
    from hpc_kernels.kernelspec import launcher_argv

    shadow = tmp_path / "shadow" / "hpc_kernels"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('shadowed')\n")
    spec = LaunchSpec(kernel="x", runtime="apptainer", mode="exec", image=str(tmp_path / "gone.sif"),
                      command=SPEC.command)
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"metadata": {"hpc_kernels": spec.to_json()}}))
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "PYTHONUSERBASE": str(shadow.parent)}
    done = subprocess.run([*launcher_argv(), str(spec_file), "/c.json"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=shadow.parent)
    assert done.returncode == 1
    assert "shadowed" not in done.stderr and "hpc-kernels build x" in done.stderr


def test_launch_path_needs_only_the_standard_library() -> None:
    """Every module the launcher can load (exec, instance, docker/podman paths) imports under ``python -I -S``
    without site-packages: no jupyter_core, yaml or rich on the kernel start path."""
    from hpc_kernels.kernelspec import launcher_argv

    python, *flags, script = launcher_argv()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import hpc_kernels.launch, hpc_kernels.runtimes.apptainer.attach, hpc_kernels.runtimes.docker.container; "
        "import hpc_kernels.runtimes.apptainer.watcher, hpc_kernels.runtimes.podman, hpc_kernels.runtimes.job.launcher; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'__main__'})))"
    )
    root = str(Path(script).parent.parent)
    done = subprocess.run([python, *flags, "-c", code, root], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hpc_kernels"]


def test_launcher_runs_as_module_too(tmp_path: Path) -> None:
    """``python -m hpc_kernels.launch`` (kernelspecs installed by earlier versions) still works."""
    done = subprocess.run([sys.executable, "-I", "-m", "hpc_kernels.launch"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_runtime_recorded_at_install_is_the_last_resort(tmp_path: Path) -> None:
    recorded = tmp_path / "cvmfs" / "apptainer"
    recorded.parent.mkdir()
    recorded.write_text("#!/bin/sh\n")
    recorded.chmod(0o755)
    empty = {"PATH": str(tmp_path / "nothing")}
    assert apptainer.find_binary(empty, fallback=str(recorded)) == str(recorded)
    with pytest.raises(Exception, match="module load apptainer"):
        apptainer.find_binary(empty, fallback=str(tmp_path / "gone"))


def test_a_home_set_on_purpose_is_the_containers_home() -> None:
    import pwd

    real = pwd.getpwuid(os.getuid()).pw_dir
    argv, _, _ = apptainer.exec_command(SPEC, "/c.json", "apptainer", {"HOME": real}, no_devices)
    assert "--home" not in argv
    argv, _, _ = apptainer.exec_command(SPEC, "/c.json", "apptainer", {"HOME": "/project/me/home"}, no_devices)
    assert argv[argv.index("--home") + 1] == "/project/me/home"


def test_helper_processes_start_isolated(tmp_path: Path) -> None:
    """Watchers and reapers (selfexec.module_argv) ignore a shadowing PYTHONPATH, like the launcher."""
    from hpc_kernels import selfexec

    shadow = tmp_path / "shadow" / "hpc_kernels"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('shadowed')\n")
    argv = selfexec.module_argv("hpc_kernels.runtimes.apptainer.reaper", "not-a-verb")
    assert argv[1:3] == ["-I", "-S"]
    done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(shadow.parent)}, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "usage: python -m hpc_kernels.runtimes.apptainer.reaper reap" in done.stderr


# ----------------------------------------------------------------------------- values are data (security)

def test_every_apptainer_command_tells_the_runtime_not_to_evaluate_values() -> None:
    """Without --no-eval Apptainer double-quotes APPTAINERENV_* values in a script it sources: $(...) runs."""
    host = {"JPY_SESSION_NAME": "/home/u/$(touch PWNED).ipynb"}
    commands = [
        apptainer.exec_command(SPEC, "/c.json", "/usr/bin/apptainer", host, no_devices)[0],
        apptainer.run_command(SPEC, ["python3"], "/usr/bin/apptainer", host, no_devices)[0],
        apptainer.instance_start_command(SPEC, "N", "/rt", "/pid", "/usr/bin/apptainer", host, no_devices)[0],
        apptainer.instance_exec_command(SPEC, "N", "/rt/c.json", "/usr/bin/apptainer", host, {})[0],
    ]
    for argv in commands:
        verb = argv.index("exec") if "exec" in argv else argv.index("start")
        assert argv[verb + 1:verb + 3] == ["--cleanenv", apptainer.NO_EVAL], argv
    # ...and the value itself is passed unchanged (no escaping that would arrive mangled).
    _argv, env, _w = apptainer.exec_command(SPEC, "/c.json", "/usr/bin/apptainer", host, no_devices)
    assert env["APPTAINERENV_JPY_SESSION_NAME"] == host["JPY_SESSION_NAME"]


def test_host_variables_whose_names_cannot_be_exported_are_left_out_with_a_warning() -> None:
    # One bad name aborts Apptainer's generated env script and silently drops every later variable.
    host = {"SLURM_JOB_ID": "7", "SLURM_$(x)": "1", "LC_ALL": "C"}
    _argv, env, warnings = apptainer.exec_command(SPEC, "/c.json", "/usr/bin/apptainer", host, no_devices)
    assert env["APPTAINERENV_SLURM_JOB_ID"] == "7" and env["APPTAINERENV_LC_ALL"] == "C"
    assert not any("$(x)" in k for k in env if k.startswith("APPTAINERENV_"))
    assert any("SLURM_$(x)" in w for w in warnings)


def test_a_bad_name_from_a_hand_edited_kernel_json_is_refused() -> None:
    spec = replace(SPEC, env=(("OK", "1"), ("BAD NAME", "2")))
    with pytest.raises(HpcKernelsError, match="not a valid name"):
        apptainer.exec_command(spec, "/c.json", "/usr/bin/apptainer", {}, no_devices)


def test_an_unwritable_state_directory_is_named_as_the_cause(tmp_path: Path) -> None:
    """$HOME read-only (a broken quota): an instance kernel fails on our state directory, and says so
    instead of blaming the kernel spec it has read fine."""
    from hpc_kernels.kernelspec import launcher_argv

    image = tmp_path / "x.sif"
    image.write_text("")
    spec = LaunchSpec(kernel="x", runtime="apptainer", mode="instance", image=str(image), command=SPEC.command)
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"metadata": {"hpc_kernels": spec.to_json()}}))
    blocker = tmp_path / "home-is-not-a-directory"  # as root, the one way to make a path unwritable
    blocker.write_text("")
    env = {**os.environ, "HPC_KERNELS_STATE": str(blocker / "state"), "HPC_KERNELS_APPTAINER": "/bin/true"}
    done = subprocess.run([*launcher_argv(), str(spec_file), str(tmp_path / "kernel-1.json")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert "cannot read the kernel spec" not in line
    assert line.startswith(f"hpc-kernels: kernel 'x' could not start: hpc-kernels cannot write its state "
                           f"directory {blocker / 'state'} (Not a directory: ")
    assert "set HPC_KERNELS_STATE (or XDG_STATE_HOME) to a writable directory" in line


def test_unwritable_hint_names_our_directories_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import errno

    from hpc_kernels import paths

    monkeypatch.setenv("HPC_KERNELS_STATE", str(tmp_path / "state"))
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "state" / "hosts" / "n1"))
    hint = paths.unwritable_hint(denied)
    assert hint is not None and hint.startswith(f"hpc-kernels cannot write its state directory {tmp_path}/state")
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/project/x")
    assert paths.unwritable_hint(elsewhere) is None
    assert paths.unwritable_hint(OSError(errno.EIO, "I/O error")) is None
