"""Docker/Podman adapter: exact argv, recipe conversion, Docker Desktop detection (no runtime needed)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_kernels.build import orchestrator
from hpc_kernels.errors import BuildError, HpcKernelsError
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.docker import cli as docker
from hpc_kernels.runtimes.docker import container as dk_container
from hpc_kernels.runtimes.docker import dockerfile
from hpc_kernels.runtimes.docker import sweep as dk_sweep
from hpc_kernels.runtimes.docker.cli import ContainerCLI


def spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(
        kernel="box", runtime="docker", mode="exec", image="/unused", container_image="img:1",
        command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"), gpu="none",
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_run_argv_is_exact(runtime: str) -> None:
    cli = ContainerCLI(runtime, binary=f"/usr/bin/{runtime}")
    argv, warnings = cli.run_argv(
        spec(binds=("/data", "/scratch:/s:ro"), runtime_args=("--shm-size=1g",)),
        "/rt/kernel-1.json", "hpck-box-1a2b", {"hpc-kernels.kernel": "box", "hpc-kernels.role": "kernel"},
        {"PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"},
    )
    assert warnings == []
    assert argv == [
        f"/usr/bin/{runtime}", "run", "--rm", "--init", "--network=host", "--name", "hpck-box-1a2b",
        "--label", "hpc-kernels.kernel=box", "--label", "hpc-kernels.role=kernel",
        "-v", "/rt/kernel-1.json:/run/hpc-kernels/connection.json:rw",
        "-v", "/data:/data", "-v", "/scratch:/s:ro",
        "-e", "LANG", "-e", "PYTHONNOUSERSITE",
        "--shm-size=1g", "img:1",
        "python3", "-m", "ipykernel_launcher", "-f", "/run/hpc-kernels/connection.json",
    ]


def test_shared_exec_rm_ps_argv_are_exact() -> None:
    cli = ContainerCLI("podman", binary="podman")
    run, _ = cli.shared_run_argv(spec(runtime="podman", mode="instance"), "hpck-u-box",
                                 {"hpc-kernels.kernel": "box"}, "/state/conn")
    assert run == ["podman", "run", "-d", "--init", "--network=host", "--name", "hpck-u-box",
                   "--label", "hpc-kernels.kernel=box", "-v", "/state/conn:/run/hpc-kernels/conn:rw",
                   "img:1", "sleep", "infinity"]
    assert cli.exec_argv(spec(), "hpck-u-box", "/run/hpc-kernels/conn/k.json", {"A": "1"}) == [
        "podman", "exec", "-e", "A", "hpck-u-box", "python3", "-m", "ipykernel_launcher", "-f",
        "/run/hpc-kernels/conn/k.json"]
    assert cli.rm_argv("a") == ["podman", "rm", "-f", "-t", "0", "a"]
    assert ContainerCLI("docker", "docker").rm_argv("a") == ["docker", "rm", "-f", "a"]
    assert cli.ps_argv("label=hpc-kernels.kernel") == [
        "podman", "ps", "-a", "-q", "--no-trunc", "--filter", "label=hpc-kernels.kernel"]


def test_gpu_flags_per_runtime() -> None:
    nvidia = lambda p: p == "/dev/nvidiactl"  # noqa: E731
    assert ContainerCLI("docker", "docker").gpu_args("auto", nvidia)[0] == ["--gpus", "all"]
    assert ContainerCLI("podman", "podman").gpu_args("auto", nvidia)[0] == ["--device", "nvidia.com/gpu=all"]
    flags, warnings = ContainerCLI("docker", "docker").gpu_args("rocm", nvidia)
    assert flags == [] and "no AMD GPU" in warnings[0]


def test_connection_file_path_with_colon_is_refused() -> None:
    with pytest.raises(HpcKernelsError, match="JUPYTER_RUNTIME_DIR"):
        ContainerCLI("docker", "docker").run_argv(spec(), "/a:b/k.json", "n", {}, {})


def test_docker_desktop_is_refused_in_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "docker"
    fake.write_text(f"#!{sys.executable}\nprint('Docker Desktop')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(HpcKernelsError, match=r"virtual machine \(Docker Desktop") as err:
        ContainerCLI("docker", str(fake)).check_host_network()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(HpcKernelsError, match="network=host"):
        ContainerCLI("podman", "podman").check_host_network()


def test_missing_binary_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HpcKernelsError, match="HPC_KERNELS_PODMAN"):
        docker.find_binary("podman")


def test_recipe_converts_through_spython(tmp_path: Path) -> None:
    recipe = tmp_path / "k.def"
    recipe.write_text("Bootstrap: docker\nFrom: debian:12\n%files\n    a.txt /opt/a.txt\n"
                      "%environment\n    export FOO=bar\n%post\n    echo hi > /etc/hi\n")
    text = dockerfile.dockerfile_text(recipe)
    assert text.startswith("# Generated by hpc-kernels")
    assert "FROM debian:12" in text and "ADD a.txt /opt/a.txt" in text
    assert "ENV FOO=bar" in text and "RUN echo hi > /etc/hi" in text


def test_recipe_from_a_sif_is_refused_clearly(tmp_path: Path) -> None:
    recipe = tmp_path / "k.def"
    recipe.write_text("Bootstrap: localimage\nFrom: base.sif\n")
    with pytest.raises(BuildError, match="Bootstrap: docker"):
        dockerfile.dockerfile_text(recipe)


def test_docker_binds_need_absolute_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROJ", "/project/def-x")
    assert docker.docker_binds(["data", "$PROJ:/p"]) == ["-v", f"{tmp_path}/data:{tmp_path}/data",
                                                         "-v", "/project/def-x:/p"]


def test_live_kernels_drops_dead_watchers(tmp_path: Path) -> None:
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "alive").write_text(f"{os.getpid()}\n")
    (kdir / "dead").write_text("999999999\n")
    assert dk_container.live_kernels(tmp_path) == ["alive"]
    assert not (kdir / "dead").exists()


def test_launcher_refuses_docker_desktop_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_registry: object,
) -> None:
    import subprocess

    from hpc_kernels import kernelspec, registry, specdirs

    fake = tmp_path / "fake-docker"
    fake.write_text(f"#!{sys.executable}\nprint('Docker Desktop')\n")
    fake.chmod(0o755)
    path = make_registry("kernels:\n  desk:\n    runtime: docker\n    image: python:3.12\n")  # type: ignore[operator]
    installed = kernelspec.install(registry.load(path).get("desk"), specdirs.Target())
    spec_file, conn = str(installed / "kernel.json"), str(tmp_path / "c.json")
    argv = [sys.executable, "-m", "hpc_kernels.launch", spec_file, conn]
    done = subprocess.run(
        argv,
        capture_output=True, text=True, timeout=60, env={**os.environ, "HPC_KERNELS_DOCKER": str(fake)},
    )
    assert done.returncode == 1
    assert done.stderr.startswith("hpc-kernels: ") and "Docker Desktop" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- what is left when things die

FAKE_CLI = """#!{python}
import os, sys
with open(os.environ["FAKE_CLI_LOG"], "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_CLI_FAIL"):
    sys.exit(125)
if sys.argv[1] == "ps":
    for name in os.environ.get("FAKE_CLI_EXISTING", "").split():
        if sys.argv[-1] == f"name=^{{name}}$":
            print("id-" + name)
"""


@pytest.fixture
def fake_podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in podman that logs each call (FAKE_CLI_LOG) and knows the containers FAKE_CLI_EXISTING."""
    fake = tmp_path / "bin" / "podman"
    fake.parent.mkdir()
    fake.write_text(FAKE_CLI.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "podman.log"
    log.touch()
    monkeypatch.setenv("FAKE_CLI_LOG", str(log))
    monkeypatch.setenv("HPC_KERNELS_PODMAN", str(fake))
    monkeypatch.setenv("HPC_KERNELS_DOCKER", str(tmp_path / "no-docker"))
    return log


def _shared_state(name: str) -> Path:
    sdir = dk_container.shared_dir(name)
    for sub in ("conn", "kernels"):
        (sdir / sub).mkdir(parents=True, exist_ok=True)
    (sdir / "conn" / "k1.json").write_text("{}")
    (sdir / "kernels" / "k1").write_text("999999999\n")  # its watcher is gone
    (sdir / "last_active").touch()
    os.utime(sdir / "last_active", (1, 1))
    (sdir / "lock").touch()
    return sdir


def test_a_stopped_shared_container_leaves_no_state(fake_podman: Path) -> None:
    sdir = _shared_state("hpck-u-box")
    cli = ContainerCLI("podman", os.environ["HPC_KERNELS_PODMAN"])
    assert dk_container.stop_if_idle(cli, "hpck-u-box", sdir, idle_timeout=1.0)
    assert "rm -f -t 0 hpck-u-box" in fake_podman.read_text()
    assert not sdir.exists()


def test_gc_removes_the_state_of_shared_containers_that_are_gone(fake_podman: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gone, here = _shared_state("hpck-u-gone"), _shared_state("hpck-u-here")
    monkeypatch.setenv("FAKE_CLI_EXISTING", "hpck-u-here")
    dk_container.mark_used("podman")  # gc asks only the runtimes our kernels use
    found = [(f.target, f.action) for f in dk_sweep.sweep(dry_run=True) if f.target.startswith("/")]
    assert found == [(str(gone), "would remove")]
    assert gone.is_dir() and here.is_dir()
    assert [f.target for f in dk_sweep.sweep() if f.target.startswith("/")] == [str(gone)]
    assert not gone.exists() and here.is_dir()
    # A runtime that does not answer: nothing can be judged, nothing is removed.
    monkeypatch.setenv("FAKE_CLI_FAIL", "1")
    monkeypatch.setenv("FAKE_CLI_EXISTING", "")
    assert dk_sweep.sweep_shared_dirs() == [] and here.is_dir()


LAUNCHER = """
import os, sys, time
from hpc_kernels.runtimes import parent as rt_parent
from hpc_kernels.runtimes.docker import container as dk_container
role = sys.argv[2]
args = [role, "podman", sys.argv[1], str(os.getpid()), "hpck-x-1"]
if role == "shared":
    args += [sys.argv[4], sys.argv[3], "60"]
dk_container.spawn_watcher(args + [rt_parent.parent_arg()], os.environ)
print("watching", flush=True)
time.sleep(600)
"""
PARENT = """
import os, subprocess, sys
env = dict(os.environ, JPY_PARENT_PID=str(os.getpid()))  # as jupyter_client sets it
p = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], stdout=sys.stdout, env=env)
p.wait()
"""


@pytest.mark.parametrize("role", ["kernel", "shared"])
def test_a_container_kernel_ends_when_the_process_that_started_it_dies(
    fake_podman: Path, tmp_path: Path, role: str
) -> None:
    """The Jupyter server dies without shutting its kernel down: the watcher removes the kernel's container
    (or, in a shared container, kills the kernel's process) and the client, as when the client dies."""
    from hpc_kernels import procfs

    sdir = _shared_state("hpck-x-1") if role == "shared" else tmp_path
    kid = os.urandom(6).hex()
    # The kernel in the shared container, as the host sees it: its argv names its connection file.
    marker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               f"/run/hpc-kernels/conn/{kid}.json"])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, LAUNCHER, os.environ["HPC_KERNELS_PODMAN"], role,
                               str(sdir), kid], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "watching"
        launcher = procfs.descendants(parent.pid)[0].ref
        time.sleep(0.5)
        assert "rm " not in fake_podman.read_text()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20  # the watcher gives the client 5 s to exit by itself
        while launcher.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not launcher.alive()  # the client ended with its kernel
        if role == "kernel":
            assert "rm -f -t 0 hpck-x-1" in fake_podman.read_text()
        else:
            assert marker.wait(timeout=5) == -signal.SIGKILL
    finally:
        for proc in (parent, marker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _logging_cli(tmp_path: Path) -> tuple[ContainerCLI, Path]:
    """The real adapter pointed at a stand-in program that logs its arguments and says nothing."""
    log = tmp_path / "calls.log"
    program = tmp_path / "docker"
    program.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return ContainerCLI("docker", str(program)), log


@pytest.mark.parametrize("old_id", ["sha256:old", None])
def test_a_new_image_that_cannot_start_its_kernel_gives_the_tag_back(tmp_path: Path, old_id: str | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels import registry

    reg = tmp_path / "kernels.yaml"
    reg.write_text("kernels:\n  k:\n    runtime: docker\n    image: localhost/hpc-kernels/k:latest\n")
    entry = registry.load_file(reg).kernels[0]
    cli, log = _logging_cli(tmp_path)
    ran: list[list[str]] = []

    def runner(_entry: object, image: str) -> object:
        assert image == "sha256:new"

        def run(argv: list[str]) -> tuple[int, str]:
            ran.append(list(argv))
            return 127, 'exec: "python3": executable file not found in $PATH'

        return run

    monkeypatch.setattr(cli, "runner", runner)
    tag = "localhost/hpc-kernels/k:latest"
    with pytest.raises(BuildError, match="the kernel's program 'python3' does not exist in the image"):
        orchestrator._verify_tagged(entry, cli, tag, old_id, "sha256:new", tmp_path / "b.log", lambda _l: None)
    assert ran == [["python3", "-c", "import ipykernel"]]  # the command as written: no other Python is tried
    calls = log.read_text().splitlines()
    assert calls[0] == (f"tag sha256:old {tag}" if old_id else f"rmi {tag}")
    # Fine images keep their tag.
    log.unlink()
    monkeypatch.setattr(cli, "runner", lambda _e, _i: (lambda argv: (0, "")))
    orchestrator._verify_tagged(entry, cli, tag, old_id, "sha256:new", tmp_path / "b.log", lambda _l: None)
    assert not log.exists()


def test_the_probe_container_runs_without_network_under_the_kernels_environment(tmp_path: Path) -> None:
    from hpc_kernels import registry

    reg = tmp_path / "kernels.yaml"
    reg.write_text("kernels:\n  k:\n    runtime: podman\n    image: x:1\n    env: {HPCK_X: '1'}\n")
    entry = registry.load_file(reg).kernels[0]
    cli, log = _logging_cli(tmp_path)
    assert cli.runner(entry, "sha256:new")(["python3", "-c", "import ipykernel"]) == (0, "")
    words = log.read_text().split()
    assert words[:3] == ["run", "--rm", "--network=none"] and "HPCK_X" in words
    assert words[-5:] == ["sha256:new", "python3", "-c", "import", "ipykernel"]
