"""``hpc-kernels run NAME [--] COMMAND...``: a command in the kernel's container, under the kernel's rules.

The Apptainer tests run the real CLI in a subprocess (it ``execve``s the runtime): exit codes come back,
the host environment is cleaned exactly as for the kernel, binds and ``$VAR`` expansion work, a script in
the current directory runs and writes its output there, and a GPU request on a node without one warns.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hpc_kernels import cli
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes import envpolicy
from hpc_kernels.runtimes.apptainer import cli as apptainer
from tests.helpers.proctree import holding, now_ticks, running, tree, wait_for

MARKER = "hpc-kernels test image (debian bookworm)\n"

REGISTRY = """\
kernels:
  sci:
    image: {image}
    command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
    env: {{HPCK_FROM_REGISTRY: "set by env"}}
    pass_env: [HPCK_PASSED]
    binds: ["$HPCK_DATA:/data:ro"]
  gpu:
    image: {image}
    command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
    gpu: nvidia
  shared:
    image: {image}
    mode: instance
    command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
  pod:
    runtime: podman
    image: docker.io/library/python:3.12-slim
"""


def no_devices(_path: str) -> bool:
    return False


def cli_run(args: list[str], env: dict[str, str], cwd: Path,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``hpc-kernels ARGS`` as its own process (``run`` replaces the process with the runtime)."""
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], env=env, cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def setup(make_registry: Callable[..., Path], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A registry whose images are ``image`` (default: missing), and a host environment with leaks."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("bound data\n")
    # The host's own allowlisted variables (LANG, USER...) left out: the container's variables are then ours only.
    env = {k: v for k, v in os.environ.items()
           if not any(fnmatch.fnmatchcase(k, pattern) for pattern in envpolicy.ENV_ALLOWLIST)}
    # LANG set: else Python's locale coercion adds LC_CTYPE to the environment of the CLI process.
    env.update(LANG="C.UTF-8", HPCK_DATA=str(data), HPCK_PASSED="passed through", SLURM_JOB_ID="4242", OMP_NUM_THREADS="3",
               PYTHONPATH="/leaked/pythonpath", LD_LIBRARY_PATH="/leaked/lib", HPCK_NOT_ALLOWED="leak",
               APPTAINERENV_HPCK_INJECTED="stray")
    return data, env


def test_run_and_the_kernel_share_one_argv_builder() -> None:
    spec = LaunchSpec(kernel="k", runtime="apptainer", mode="exec", image="/i.sif",
                      command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                      binds=("/a:/b",), env=(("X", "1"),), gpu="nvidia", runtime_args=("--nv-ccli",))
    host = {"SLURM_TMPDIR": "/local/tmp", "PATH": "/usr/bin"}
    kernel, kenv, kwarn = apptainer.exec_command(spec, "/c.json", "/bin/apptainer", host, no_devices)
    script, senv, swarn = apptainer.run_command(spec, ["python3", "x.py"], "/bin/apptainer", host, no_devices)
    bind = ["--bind", f"/c.json:{apptainer.CONNECTION_DST}:rw"]
    at = kernel.index(bind[0])
    assert kernel[:at] + kernel[at + 2:kernel.index("/i.sif") + 1] + ["python3", "x.py"] == script
    assert script[:8] == ["/bin/apptainer", "-q", "exec", "--cleanenv", "--no-eval", "-W", "/local/tmp", "--bind"]
    assert (senv, swarn) == (kenv, kwarn) and swarn  # same environment, same GPU warning
    # No command: the interpreter of the kernel's command.
    assert apptainer.run_command(spec, [], "/bin/apptainer", host, no_devices)[0][-2:] == ["/i.sif", "python3"]


def test_dry_run_prints_the_command(make_registry: Callable[..., Path], setup: tuple[Path, dict[str, str]],
                                    tmp_path: Path) -> None:
    data, env = setup
    image = tmp_path / "sci.sif"
    image.write_bytes(b"")  # only printed, never run
    env["HPC_KERNELS_APPTAINER"] = "/bin/true"  # the runtime is resolved, not started
    path = make_registry(REGISTRY.format(image=image))
    done = cli_run(["run", "--registry", str(path), "--dry-run", "sci", "--", "python3", "-V"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    at = words.index("/bin/true")
    # the tests' isolated $HOME is not the passwd home: the container gets it as its home
    assert words[at:] == ["/bin/true", "-q", "exec", "--cleanenv", "--no-eval", "--home", env["HOME"], "--bind", f"{data}:/data:ro", str(image),
                          "python3", "-V"]
    assert words[:at] == ["APPTAINERENV_HPCK_FROM_REGISTRY=set by env", "APPTAINERENV_HPCK_PASSED=passed through",
                          "APPTAINERENV_LANG=C.UTF-8", "APPTAINERENV_OMP_NUM_THREADS=3", "APPTAINERENV_PYTHONNOUSERSITE=1",
                          "APPTAINERENV_SLURM_JOB_ID=4242"]


def test_run_falls_back_to_the_apptainer_recorded_at_install(make_registry: Callable[..., Path],
                                                             setup: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Like the kernel's launcher: with no Apptainer on PATH, the one that was there at install time."""
    _data, env = setup
    image = tmp_path / "sci.sif"
    image.write_bytes(b"")  # only printed, never run
    cvmfs = tmp_path / "cvmfs" / "apptainer"
    cvmfs.parent.mkdir()
    cvmfs.write_text("#!/bin/sh\nexit 0\n")
    cvmfs.chmod(0o755)
    path = make_registry(REGISTRY.format(image=image))
    done = cli_run(["install", "--registry", str(path), "sci"], dict(env, PATH=f"{cvmfs.parent}:{env['PATH']}"),
                   tmp_path)
    assert done.returncode == 0, done.stderr
    empty = tmp_path / "bin"
    empty.mkdir()
    env["PATH"] = str(empty)  # a session where nobody ran 'module load apptainer'
    done = cli_run(["run", "--registry", str(path), "--dry-run", "sci", "--", "python3", "-V"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(cvmfs) in shlex.split(done.stdout)
    # Not installed: nothing to fall back to, and the error says what to load.
    done = cli_run(["run", "--registry", str(path), "--dry-run", "gpu"], env, tmp_path)
    assert done.returncode == 1 and "module load apptainer" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.apptainer
def test_exit_code_environment_binds_and_stdin(make_registry: Callable[..., Path], base_sif: Path,
                                               apptainer_bin: str, setup: tuple[Path, dict[str, str]],
                                               tmp_path: Path) -> None:
    _data, env = setup
    env["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{env['PATH']}"
    # As in a Slurm job: the runtime's workdir is the job's local scratch (-W), as for the kernel.
    env["SLURM_TMPDIR"] = str(tmp_path / "slurm-tmp")
    Path(env["SLURM_TMPDIR"]).mkdir()
    path = make_registry(REGISTRY.format(image=base_sif))
    reg = ["run", "--registry", str(path), "sci"]

    done = cli_run([*reg, "--", "python3", "-c", "import sys; sys.exit(7)"], env, tmp_path)
    assert (done.returncode, done.stderr) == (7, "")

    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    done = cli_run([*reg, "--", "python3", "-c", dump], env, tmp_path)
    assert done.returncode == 0, done.stderr
    inside = json.loads(done.stdout)
    assert inside["HPCK_FROM_REGISTRY"] == "set by env" and inside["HPCK_PASSED"] == "passed through"
    assert (inside["SLURM_JOB_ID"], inside["OMP_NUM_THREADS"], inside["PYTHONNOUSERSITE"]) == ("4242", "3", "1")
    assert inside["SLURM_TMPDIR"] == env["SLURM_TMPDIR"]
    for leak in ("PYTHONPATH", "HPCK_NOT_ALLOWED", "HPCK_INJECTED", "HPCK_DATA"):
        assert leak not in inside, leak
    assert "/leaked" not in inside.get("LD_LIBRARY_PATH", "")  # Apptainer sets its own

    # The kernel's bind, its $VAR expanded on the host; the file only the image has.
    done = cli_run([*reg, "cat", "/data/input.txt", "/etc/hpck-test-image"], env, tmp_path)
    assert (done.returncode, done.stdout) == (0, "bound data\n" + MARKER), done.stderr

    # No command: the kernel's interpreter, reading a script from stdin (as in a batch job's heredoc).
    done = cli_run(reg, env, tmp_path, stdin="import sys; print(sys.version_info[:2]); sys.exit(3)\n")
    assert (done.returncode, done.stdout) == (3, "(3, 11)\n"), done.stderr


@pytest.mark.apptainer
def test_a_killed_run_leaves_nothing(make_registry: Callable[..., Path], base_sif: Path, apptainer_bin: str,
                                     setup: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Before: SIGKILL of a running ``hpc-kernels run`` (a job's time limit, a kill) left Apptainer's
    ``squashfuse_ll`` and the command itself running, reparented to PID 1, holding the image."""
    _data, env = setup
    env["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{env['PATH']}"
    path = make_registry(REGISTRY.format(image=base_sif))
    since = now_ticks()
    # Not a session of its own: as in a batch script, whose session the watcher must not touch.
    run = subprocess.Popen([sys.executable, "-m", "hpc_kernels", "run", "--registry", str(path), "sci", "--",
                            "sleep", "300"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any(p.comm == "sleep" for p in tree(run.pid)), 60), "the command never started"
        started = tree(run.pid) | set(holding(base_sif, since))
        assert any(p.comm.startswith("squashfuse") for p in started) or os.geteuid() == 0, started
    finally:
        run.kill()
        run.wait()
    assert wait_for(lambda: not running(started) and not holding(base_sif, since), 15), \
        f"left after SIGKILL of 'hpc-kernels run': {running(started)}, holding the image: {holding(base_sif, since)}"


@pytest.mark.apptainer
def test_script_in_the_current_directory(make_registry: Callable[..., Path], base_sif: Path, apptainer_bin: str,
                                         setup: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _data, env = setup
    env["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{env['PATH']}"
    path = make_registry(REGISTRY.format(image=base_sif))
    work = tmp_path / "analysis"
    work.mkdir()
    (work / "analysis.py").write_text(
        "import os, sys\n"
        "marker = open('/etc/hpck-test-image').read().strip()\n"
        "open('result.txt', 'w').write(f'{os.getcwd()}|{marker}|{sys.argv[1:]}')\n"
    )
    done = cli_run(["run", "--registry", str(path), "sci", "--", "python3", "analysis.py", "--n", "5"], env, work)
    assert done.returncode == 0, done.stderr
    assert (work / "result.txt").read_text() == f"{work}|{MARKER.strip()}|['--n', '5']"


@pytest.mark.apptainer
def test_instance_mode_kernel_gets_a_fresh_container(make_registry: Callable[..., Path], base_sif: Path,
                                                     apptainer_bin: str, setup: tuple[Path, dict[str, str]],
                                                     tmp_path: Path) -> None:
    _data, env = setup
    env["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{env['PATH']}"
    path = make_registry(REGISTRY.format(image=base_sif))
    done = cli_run(["run", "--registry", str(path), "shared", "cat", "/etc/hpck-test-image"], env, tmp_path)
    assert (done.returncode, done.stdout) == (0, MARKER), done.stderr
    # `apptainer exec IMAGE`, not `instance://`: run never starts or joins the kernels' shared instance.
    dry = cli_run(["run", "--registry", str(path), "--dry-run", "shared", "true"], env, tmp_path)
    assert shlex.split(dry.stdout)[-2:] == [str(base_sif), "true"] and "instance://" not in dry.stdout


@pytest.mark.apptainer
def test_gpu_request_on_a_node_without_one_warns_and_runs(make_registry: Callable[..., Path], base_sif: Path,
                                                          apptainer_bin: str, setup: tuple[Path, dict[str, str]],
                                                          tmp_path: Path) -> None:
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"):
        pytest.skip("this node has an NVIDIA GPU: the no-GPU warning cannot happen here")
    _data, env = setup
    env["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{env['PATH']}"
    path = make_registry(REGISTRY.format(image=base_sif))
    done = cli_run(["run", "--registry", str(path), "gpu", "true"], env, tmp_path)
    assert done.returncode == 0
    assert done.stderr == "hpc-kernels: warning: gpu: nvidia requested but this node has no NVIDIA device\n"


def test_unsupported_runtime_and_missing_image_are_one_sentence(make_registry: Callable[..., Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry(REGISTRY.format(image="/nonexistent/sci.sif"))
    assert cli.main(["run", "--registry", str(path), "pod", "python", "-V"]) == 1
    err = capsys.readouterr().err
    assert err == ("hpc-kernels: error: 'hpc-kernels run' is not supported for kernel 'pod' yet: it uses runtime "
                   "'podman', and run only starts Apptainer containers; use 'podman run' yourself.\n")
    assert cli.main(["run", "--registry", str(path), "sci"]) == 1
    assert capsys.readouterr().err == ("hpc-kernels: error: the image of kernel 'sci' is missing "
                                       "(/nonexistent/sci.sif); build it with 'hpc-kernels build sci'.\n")
