"""Docker/Podman kernels end to end: rootless Podman as the unprivileged test user, and a real Docker
Engine (Debian's docker.io, dockerd --bridge=none) driven by the docker CLI.

Set up by ``.ci/podman-setup.sh`` (the user's image localhost/hpck-test:bookworm) and ``.ci/docker-setup.sh``
(dockerd on /run/docker.sock, the same image imported). Every test proves nothing of ours is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import kernelspec, model, registry, specdirs
from hpc_kernels.build import orchestrator, stamps
from hpc_kernels.errors import BuildError
from hpc_kernels.runtimes.docker import container as dk_container
from hpc_kernels.runtimes.docker import sweep as dk_sweep
from hpc_kernels.runtimes.docker import watcher as dk_watcher
from hpc_kernels.runtimes.docker.cli import ContainerCLI
from tests.helpers.kernels import run_cell, start_ready_kernel

pytestmark = pytest.mark.podman

TEST_IMAGE = "localhost/hpck-test:bookworm"
DOCKER_SOCKET = Path(os.environ.get("HPCK_DOCKER_SOCKET", "/run/docker.sock"))
RUNTIMES = ["podman", pytest.param("docker", marks=pytest.mark.docker)]
COMMAND = '[python3, -m, ipykernel_launcher, -f, "{connection_file}"]'
PROBE = ("import os; print('IMAGE', os.path.exists('/etc/hpck-test-image'), "
         "'ENV', os.environ.get('PYTHONNOUSERSITE'), os.environ.get('HPCK_FROM_REGISTRY'))")
IN_IMAGE = "IMAGE True ENV 1 yes"  # in the image, with the cleaned environment and the registry's env


def sh(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="session")
def podman() -> str:
    found = shutil.which("podman")
    if not found:
        pytest.skip("podman is not installed (bash .ci/podman-setup.sh installs it)")
    if sh(found, "image", "exists", TEST_IMAGE).returncode != 0:
        pytest.skip(f"test image {TEST_IMAGE} missing (bash .ci/podman-setup.sh imports it)")
    return found


@pytest.fixture(scope="session")
def docker_host() -> str:
    """DOCKER_HOST of the real Docker Engine, checked with the real docker CLI (the test user is in `docker`)."""
    if not shutil.which("docker"):
        pytest.skip("the docker CLI is not installed (bash .ci/docker-setup.sh installs docker.io)")
    host = f"unix://{DOCKER_SOCKET}"
    if not DOCKER_SOCKET.is_socket() or sh("docker", "version", env={**os.environ, "DOCKER_HOST": host}).returncode:
        pytest.skip(f"no Docker Engine answers on {DOCKER_SOCKET} (bash .ci/docker-setup.sh starts dockerd)")
    if sh("docker", "image", "inspect", TEST_IMAGE, env={**os.environ, "DOCKER_HOST": host}).returncode:
        pytest.skip(f"test image {TEST_IMAGE} missing in Docker (bash .ci/docker-setup.sh imports it)")
    return host


def engine(runtime: str, podman: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI that sees ``runtime``'s containers (DOCKER_HOST set for docker)."""
    if runtime == "docker":
        monkeypatch.setenv("DOCKER_HOST", request.getfixturevalue("docker_host"))
        return str(shutil.which("docker"))
    return podman


def ours(podman: str, *filters: str) -> list[str]:
    argv = [podman, "ps", "-a", "--format", "{{.Names}}", "--filter", "label=hpc-kernels.kernel"]
    for f in filters:
        argv += ["--filter", f]
    return sh(*argv).stdout.split()


def open_ports(km: Any) -> list[int]:
    busy = []
    for port in (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port):
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def eventually(check: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll ``check`` until it returns something falsy; returns the last value (falsy on success)."""
    deadline = time.monotonic() + timeout
    value = check()
    while value and time.monotonic() < deadline:
        time.sleep(0.3)
        value = check()
    return value


def install(make_registry: Any, name: str, runtime: str, extra: str = "") -> model.KernelEntry:
    path = make_registry(f"""
        kernels:
          {name}:
            runtime: {runtime}
            image: {TEST_IMAGE}
            command: {COMMAND}
            env: {{HPCK_FROM_REGISTRY: "yes"}}
            {extra}
        """)
    entry = registry.load(path).get(name)
    kernelspec.install(entry, specdirs.Target())
    return entry


def start(name: str, isolated_home: Path) -> tuple[Any, Any]:
    from jupyter_client.manager import KernelManager

    runtime_dir = isolated_home / "rt"
    runtime_dir.mkdir(exist_ok=True)

    def manager() -> Any:
        connection_file = runtime_dir / f"kernel-{secrets.token_hex(4)}.json"
        return KernelManager(kernel_name=name, connection_file=str(connection_file))

    # Retries a kernel that died at start-up (jupyter_client's port race; Podman's Docker API now and
    # then answers the docker CLI's attach with "unable to upgrade to tcp, received 409").
    return start_ready_kernel(manager)


def interrupt_sleep(km: Any, kc: Any) -> dict[str, Any]:
    """Interrupt ``time.sleep(30)``; returns the interrupted cell's reply."""
    msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(30)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the cell runs
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
            break
    km.interrupt_kernel()
    while True:
        reply = kc.get_shell_msg(timeout=15)
        if reply["parent_header"].get("msg_id") == msg_id:
            content: dict[str, Any] = reply["content"]
            break
    # ipykernel 6.17 aborts requests arriving right after an interrupted cell (stop_on_error window).
    time.sleep(1.0)
    return content


@pytest.fixture
def cleanup(podman: str) -> Iterator[list[Any]]:
    """Kernel managers to shut down whatever happens; then remove anything of ours still there."""
    managers: list[Any] = []
    yield managers
    clis = [podman] + [m for m in managers if isinstance(m, str)]
    for km in managers:
        if not isinstance(km, str) and km.has_kernel:
            km.shutdown_kernel(now=True)
    for cli in clis:
        for name in ours(cli, f"label=hpc-kernels.owner={dk_container.user_name()}"):
            sh(cli, "rm", "-f", name)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_kernel_lifecycle_leaves_nothing(
    runtime: str, podman: str, make_registry: Any, isolated_home: Path, cleanup: list[Any],
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:
    cli = engine(runtime, podman, request, monkeypatch)
    cleanup.append(cli)
    name = f"box-{runtime}"
    install(make_registry, name, runtime)
    km, kc = start(name, isolated_home)
    cleanup.append(km)
    try:
        content, out = run_cell(kc, PROBE)
        assert content["status"] == "ok" and IN_IMAGE in out
        [container] = ours(cli, f"label=hpc-kernels.kernel={name}")
        labels = sh(cli, "inspect", "--format", "{{json .Config.Labels}}", container).stdout
        assert km.connection_file in labels and "hpc-kernels.pid" in labels
        assert stat.S_IMODE(os.stat(km.connection_file).st_mode) == 0o600

        content = interrupt_sleep(km, kc)
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
        content, out = run_cell(kc, "x = 41; print(x + 1)")
        assert content["status"] == "ok" and "42" in out  # the kernel survived the interrupt

        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=90)
        content, _ = run_cell(kc, "x")
        assert content["status"] == "error" and content["ename"] == "NameError"  # a fresh kernel
        assert eventually(lambda: len(ours(cli, f"label=hpc-kernels.kernel={name}")) != 1) is False

        kc.execute("import os; os._exit(1)")  # the kernel crashes: its container goes with it
        assert not eventually(lambda: km.is_alive() or ours(cli, f"label=hpc-kernels.kernel={name}"))
        km.restart_kernel(now=True)  # what Jupyter's restarter does after a crash
        kc.wait_for_ready(timeout=90)
        assert run_cell(kc, PROBE)[0]["status"] == "ok"
    finally:
        kc.stop_channels()
    km.shutdown_kernel(now=False)
    assert eventually(lambda: ours(cli, f"label=hpc-kernels.kernel={name}") or open_ports(km)) == []

    # SIGTERM (jupyter_client's fallback when a kernel ignores shutdown_request) reaches the kernel:
    # the client proxies it and --init forwards it (Python as PID 1 would ignore it).
    km, kc = start(name, isolated_home)
    cleanup.append(km)
    kc.stop_channels()
    os.killpg(km.provisioner.process.pid, signal.SIGTERM)
    assert not eventually(lambda: km.is_alive() or ours(cli, f"label=hpc-kernels.kernel={name}"))
    km.shutdown_kernel(now=True)

    # SIGKILL of the launcher's whole process group (what a crashed Jupyter server's kill does).
    km, kc = start(name, isolated_home)
    cleanup.append(km)
    kc.stop_channels()
    assert ours(cli, f"label=hpc-kernels.kernel={name}")
    os.killpg(km.provisioner.process.pid, signal.SIGKILL)
    assert eventually(lambda: ours(cli, f"label=hpc-kernels.kernel={name}") or open_ports(km)) == []
    km.shutdown_kernel(now=True)



def test_shared_container_four_kernels_then_idle_stop(
    podman: str, make_registry: Any, isolated_home: Path, cleanup: list[Any],
) -> None:
    name = "shared-box"
    install(make_registry, name, "podman", "mode: instance\n            idle_timeout: 2")
    shared = f"label=hpc-kernels.kernel={name}"
    kms = []
    for _ in range(4):
        km, kc = start(name, isolated_home)
        cleanup.append(km)
        kms.append((km, kc))
    assert ours(podman, shared) == [dk_container.shared_name(name)]  # one container for all four
    pids = set()
    for _km, kc in kms:
        content, out = run_cell(kc, PROBE + "; print('PID', os.getpid())")
        assert content["status"] == "ok" and IN_IMAGE in out
        pids.add(out.split("PID")[1].strip())
    assert len(pids) == 4  # four kernels, one container

    km, kc = kms[0]  # message-mode interrupt (exec forwards no signal)
    assert km.kernel_spec.interrupt_mode == "message"
    content = interrupt_sleep(km, kc)
    assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
    assert run_cell(kc, "1 + 1")[0]["status"] == "ok"

    for _km, kc in kms:
        kc.stop_channels()
    kms[0][0].shutdown_kernel(now=False)  # graceful
    kms[1][0].shutdown_kernel(now=True)  # hard kill: SIGKILL of the launcher's group
    os.killpg(kms[2][0].provisioner.process.pid, signal.SIGKILL)  # a crashed server
    kms[2][0].shutdown_kernel(now=True)
    # A kernel still running keeps the container: the watcher of the others must not stop it.
    time.sleep(3)
    assert ours(podman, shared) == [dk_container.shared_name(name)]
    assert eventually(lambda: [p for km, _ in kms[:3] for p in open_ports(km)]) == []
    kms[3][0].shutdown_kernel(now=False)
    assert eventually(lambda: ours(podman, shared) or open_ports(kms[3][0])) == []


class CountingCLI(ContainerCLI):
    """The real adapter, counting the builds it runs."""

    builds = 0

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: Callable[[str], None]) -> None:
        type(self).builds += 1
        super().build(recipe, dest, options, on_line)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_build_from_def_through_spython_then_noop(
    runtime: str, podman: str, make_registry: Any, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    podman = engine(runtime, podman, request, monkeypatch)
    name = f"built-{runtime}-{secrets.token_hex(3)}"  # a fresh tag: no earlier run's image counts
    path = make_registry(f"""
        kernels:
          {name}:
            runtime: {runtime}
            def: k.def
        """, {"k.def": f"""
        Bootstrap: docker
        From: {TEST_IMAGE}

        %files
            payload.txt /opt/payload.txt

        %post
            echo built-by-hpck > /etc/hpck-built
        """, "payload.txt": "payload\n"})
    entry = registry.load(path).get(name)
    tag = str(entry.container_image)
    try:
        assert stamps.image_state(entry).status == "missing"
        cli = CountingCLI(runtime)
        result = orchestrator.build(entry, builder=cli)
        assert result.action == "built" and CountingCLI.builds == 1
        out = sh(podman, "run", "--rm", tag, "cat", "/etc/hpck-built", "/opt/payload.txt")
        assert out.returncode == 0 and "built-by-hpck" in out.stdout and "payload" in out.stdout
        assert stamps.image_state(entry).status == "built"
        image_id = sh(podman, "image", "inspect", "--format", "{{.Id}}", tag).stdout

        again = orchestrator.build(entry, builder=cli)  # nothing changed: no build runs
        assert again.action == "up-to-date" and CountingCLI.builds == 1
        assert sh(podman, "image", "inspect", "--format", "{{.Id}}", tag).stdout == image_id

        (path.parent / "payload.txt").write_text("changed\n")  # a %files input changed: stale
        assert stamps.image_state(entry).status == "stale"
    finally:
        CountingCLI.builds = 0
        sh(podman, "rmi", "-f", tag)


def test_a_built_image_that_cannot_start_its_kernel_keeps_the_old_tag(podman: str, make_registry: Any) -> None:
    name = f"probe-{secrets.token_hex(3)}"
    recipe = f"Bootstrap: docker\nFrom: {TEST_IMAGE}\n\n%post\n    echo one > /etc/hpck-built\n"
    path = make_registry(f"kernels:\n  {name}:\n    runtime: podman\n    def: k.def\n", {"k.def": recipe})
    entry = registry.load(path).get(name)
    tag = str(entry.container_image)
    try:
        assert orchestrator.build(entry).action == "built"
        good = sh(podman, "image", "inspect", "--format", "{{.Id}}", tag).stdout
        # The kernel's `python3 -m ipykernel_launcher` cannot start in this one: the build fails, the tag stays.
        (path.parent / "k.def").write_text(recipe + "    rm -rf /usr/lib/python3/dist-packages/ipykernel\n")
        with pytest.raises(BuildError, match="No module named 'ipykernel'"):
            orchestrator.build(entry)
        assert sh(podman, "image", "inspect", "--format", "{{.Id}}", tag).stdout == good
        assert stamps.image_state(entry).status == "stale"
    finally:
        sh(podman, "rmi", "-f", tag)


def test_gc_sweeps_leaked_containers(podman: str) -> None:
    from hpc_kernels import paths

    dead = subprocess.Popen(["true"])
    dead.wait()
    common = ["--label", f"hpc-kernels.host={paths.hostname()}",
              "--label", f"hpc-kernels.owner={dk_container.user_name()}"]
    leaked = f"hpck-leak-{secrets.token_hex(3)}"
    alive = f"hpck-alive-{secrets.token_hex(3)}"
    try:
        for cname, pid in ((leaked, dead.pid), (alive, os.getpid())):
            res = sh(podman, "run", "-d", "--name", cname, "--label", f"hpc-kernels.kernel={cname}",
                     "--label", "hpc-kernels.role=kernel", "--label", f"hpc-kernels.pid={pid}",
                     *common, TEST_IMAGE, "sleep", "60")
            assert res.returncode == 0, res.stderr
        # The launcher of a podman kernel marks podman as in use: gc asks only runtimes a kernel uses.
        dk_container.mark_used("podman")
        # `hpc-kernels gc --dry-run` names the leaked container and removes nothing.
        done = subprocess.run([sys.executable, "-m", "hpc_kernels", "gc", "--dry-run", "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        found = [f for f in json.loads(done.stdout)["findings"] if f["sweeper"] == "containers"]
        assert (leaked, "would remove") in [(f["target"], f["action"]) for f in found]
        assert alive not in [f["target"] for f in found]
        assert ours(podman, f"name={leaked}") == [leaked]
        removed = dk_sweep.sweep_containers(("podman",))
        assert leaked in removed and alive not in removed
        assert ours(podman, f"name={leaked}") == [] and ours(podman, f"name={alive}") == [alive]
    finally:
        for cname in (leaked, alive):
            sh(podman, "rm", "-f", "-t", "0", cname)


def test_shared_container_moves_to_a_rebuilt_image_once_idle(
    podman: str, make_registry: Any, isolated_home: Path, cleanup: list[Any],
) -> None:
    name = f"rebuilt-{secrets.token_hex(3)}"
    recipe = "Bootstrap: docker\nFrom: {image}\n%post\n    echo {version} > /etc/version\n"
    path = make_registry(f"""
        kernels:
          {name}:
            runtime: podman
            mode: instance
            idle_timeout: 60
            def: k.def
            command: {COMMAND}
        """, {"k.def": recipe.format(image=TEST_IMAGE, version="v1")})
    entry = registry.load(path).get(name)
    tag = str(entry.container_image)
    version = "print(open('/etc/version').read())"
    try:
        orchestrator.build(entry)
        kernelspec.install(entry, specdirs.Target())
        km1, kc1 = start(name, isolated_home)
        cleanup.append(km1)
        old_image = sh(podman, "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        (path.parent / "k.def").write_text(recipe.format(image=TEST_IMAGE, version="v2"))
        assert orchestrator.build(entry).action == "built"
        km2, kc2 = start(name, isolated_home)  # a kernel still runs in it: the container stays
        cleanup.append(km2)
        assert "v1" in run_cell(kc2, version)[1]
        for km, kc in ((km1, kc1), (km2, kc2)):
            kc.stop_channels()
            km.shutdown_kernel(now=False)
        km3, kc3 = start(name, isolated_home)  # idle now: replaced, and the old build dropped
        cleanup.append(km3)
        assert "v2" in run_cell(kc3, version)[1]
        kc3.stop_channels()
        assert sh(podman, "image", "exists", old_image).returncode != 0
        km3.shutdown_kernel(now=False)
    finally:
        sh(podman, "rm", "-f", "-t", "0", dk_container.shared_name(name))
        sh(podman, "rmi", "-f", tag)
        for pid in dk_watcher.pids_with_argument(dk_container.shared_name(name)):
            os.kill(pid, signal.SIGTERM)  # watchers waiting out the 60 s idle timeout
