"""Nothing of an Apptainer kernel outlives it, on every exit path and in every mode (real Apptainer).

Run as an unprivileged user, Apptainer mounts the SIF with ``squashfuse_ll``, a child of its starter in
a process group of its own; as root it uses the kernel's squashfs and that leak cannot happen (the tests
still run and check the rest). Each scenario starts a kernel through jupyter_client, has it start a
daemonised child (as a notebook may), records the processes that were really started (the launcher's
descendants, by pid and start time, read from /proc here, not through hpc_kernels), ends the kernel one
way, and then checks that none of them runs and that no process of this user started during the test
still holds the image open. The image is a copy private to this module, so those checks see only
what these tests started.

Kill paths: jupyter_client's shutdown; SIGKILL of the kernel's pid alone (the OOM killer, a ``kill -9``);
SIGKILL of the launcher's process group (jupyter_client's hard kill); the Jupyter client process dying
without shutting its kernel down (a JupyterHub session reaching its time limit, a server crash).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, kernelspec, paths, registry, specdirs
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.apptainer import status as app_status
from tests.helpers.kernels import run_cell, start_ready_kernel
from tests.helpers.proctree import Proc, holding, kill_all, now_ticks, running, stat, tree, wait_for

pytestmark = pytest.mark.apptainer

IDLE = 2.0
#: "The kernel must be gone within a few seconds" (bounded generously for a loaded 2-core machine).
GONE_WITHIN = 8.0
#: An idle instance is stopped within its timeout plus the reaper's poll, plus slack.
IDLE_MARGIN = 20.0
UNPRIVILEGED = os.geteuid() != 0
DAEMON = "import subprocess; p = subprocess.Popen(['sleep', '1000'], start_new_session=True); print(p.pid)"
CLIENT = """\
import os, sys, time
from jupyter_client import KernelManager
km = KernelManager(kernel_name=sys.argv[1], connection_file=sys.argv[2])
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=120)
with open(sys.argv[3] + ".tmp", "w") as fh:
    fh.write(str(km.provisioner.pid))
os.replace(sys.argv[3] + ".tmp", sys.argv[3])
time.sleep(3600)
"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image(base_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test image for this module alone (its own inode: holders are ours)."""
    copy = tmp_path_factory.mktemp("image") / "leakcheck.sif"
    shutil.copyfile(base_sif, copy)
    return copy


@dataclass
class Scene:
    """One scenario's kernel: what jupyter_client knows and what was really started."""

    mode: str
    pid: int
    kc: Any
    km: Any = None
    client: subprocess.Popen[bytes] | None = None
    started: set[Proc] | None = None


@pytest.fixture
def scene(image: Path, apptainer_bin: str, make_registry: Callable[..., Path],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Kernelspecs 'exec' and 'instance' on the private image; cleans up whatever a failing test left."""
    # gc here must not judge the Docker/Podman containers of other tests of this user (not ours to remove).
    monkeypatch.setenv("HPC_KERNELS_PODMAN", "/nonexistent/podman")
    monkeypatch.setenv("HPC_KERNELS_DOCKER", "/nonexistent/docker")
    monkeypatch.setenv("PATH", f"{os.path.dirname(apptainer_bin)}{os.pathsep}{os.environ['PATH']}")
    command = '[python3, -m, ipykernel_launcher, -f, "{connection_file}"]'
    path = make_registry(f"""
        kernels:
          exec:
            image: {image}
            command: {command}
          instance:
            image: {image}
            mode: instance
            idle_timeout: {IDLE}
            command: {command}
        """)
    for entry in registry.load_file(path).kernels:
        kernelspec.install(entry, specdirs.Target(), path)
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    runtime.mkdir(parents=True, exist_ok=True)
    since = now_ticks()
    state: dict[str, Any] = {"since": since, "runtime": runtime, "scenes": []}
    try:
        yield state
    finally:
        for sc in state["scenes"]:
            with contextlib.suppress(Exception):
                sc.kc.stop_channels()
            if sc.client is not None and sc.client.poll() is None:
                sc.client.kill()
                sc.client.wait()
            if sc.km is not None:
                with contextlib.suppress(Exception):
                    sc.km.shutdown_kernel(now=True) if sc.km.is_alive() else sc.km.cleanup_resources()
            kill_all(running(sc.started or set()))
        for st in app_status.list_instances():
            with contextlib.suppress(HpcKernelsError):
                app_status.stop(st.name)
        out = subprocess.run(["pgrep", "-f", f"hpc_kernels.runtimes.apptainer.reaper.* reap {app_instance.root()}"],
                             capture_output=True, text=True).stdout
        kill_all([Proc(int(p), 0, "reaper") for p in out.split()])
        kill_all(holding(image, since))


def start(state: dict[str, Any], mode: str, through_client: bool = False) -> Scene:
    """Start a kernel of ``mode`` (in this process, or in a client process of its own) and connect to it."""
    cf = state["runtime"] / f"kernel-{uuid.uuid4()}.json"
    if through_client:
        pid_file = state["runtime"] / f"{cf.stem}.pid"
        client = subprocess.Popen([sys.executable, "-c", CLIENT, mode, str(cf), str(pid_file)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: pid_file.exists() or client.poll() is not None, 120)
        assert client.poll() is None, "the client process could not start its kernel"
        from jupyter_client import BlockingKernelClient

        kc = BlockingKernelClient(connection_file=str(cf))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        sc = Scene(mode, int(pid_file.read_text()), kc, client=client)
    else:
        from jupyter_client import KernelManager

        km, kc = start_ready_kernel(lambda: KernelManager(kernel_name=mode, connection_file=str(cf)))
        sc = Scene(mode, int(km.provisioner.pid), kc, km=km)
    state["scenes"].append(sc)
    return sc


def record_started(sc: Scene) -> set[Proc]:
    """Have the kernel start a daemonised child, then record every process the launcher's tree holds."""
    reply, _out = run_cell(sc.kc, DAEMON)
    assert reply["status"] == "ok", reply
    started = tree(sc.pid)
    names = sorted(p.comm for p in started)
    assert "sleep" in names, names  # the daemon (its pid is the container's own in instance mode)
    assert "python3" in names, names  # the kernel (the image's python3)
    assert "starter" in names or sc.mode == "instance", names
    if UNPRIVILEGED and sc.mode == "exec":
        assert "squashfuse_ll" in names, names  # ... else this test could not see the leak it is about
    sc.started = started
    return started


def end(sc: Scene, how: str) -> None:
    if how == "shutdown":
        sc.kc.stop_channels()
        sc.km.shutdown_kernel(now=False)
    elif how == "sigkill-pid":
        os.kill(sc.pid, signal.SIGKILL)
    elif how == "sigkill-group":
        os.killpg(sc.pid, signal.SIGKILL)
    elif how == "client-dies":
        assert sc.client is not None
        sc.client.kill()
        sc.client.wait()
    else:  # pragma: no cover
        raise AssertionError(how)


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- every exit path, every mode

HOW = ["shutdown", "sigkill-pid", "sigkill-group", "client-dies"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("mode", ["exec", "instance"])
def test_nothing_of_a_kernel_outlives_it(scene: dict[str, Any], image: Path, mode: str, how: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # In instance mode a second kernel keeps the instance up: what ends the first kernel's processes is
    # then what this test is about, not the instance's idle stop.
    keeper = start(scene, mode) if mode == "instance" else None
    sc = start(scene, mode, through_client=how == "client-dies")
    started = record_started(sc)
    t0 = time.monotonic()
    end(sc, how)

    # The kernel and everything it started end within seconds (with a client gone: ended for it).
    assert wait_for(lambda: not running(started), GONE_WITHIN), \
        f"still running {GONE_WITHIN:g} s after {how}: {running(started)}"
    took = time.monotonic() - t0
    if keeper is not None:
        reply, out = run_cell(keeper.kc, "print('the other kernel works')")
        assert reply["status"] == "ok" and "works" in out
        end(keeper, "shutdown")
    if mode == "exec":
        # Nothing holds the image any more: no starter, no squashfuse_ll.
        assert wait_for(lambda: not holding(image, scene["since"]), GONE_WITHIN), holding(image, scene["since"])
        assert wait_for(lambda: not list((paths.host_state_dir() / "kernels").glob("*.json")), GONE_WITHIN)
    else:
        # The shared instance outlives its kernels by its idle timeout, then goes, and all it held.
        assert wait_for(lambda: not holding(image, scene["since"]), IDLE + IDLE_MARGIN), \
            holding(image, scene["since"])
        assert wait_for(lambda: not app_status.instance_dirs(), 10)
    assert cli_json(capsys, "gc", "--dry-run")["findings"] == []
    print(f"{mode}/{how}: the kernel's processes were gone {took:.2f} s after", file=sys.__stderr__)


# ----------------------------------------------------------------------------- gc finishes what a crash left


def watchers() -> list[int]:
    """The pids of the exec-kernel watchers this test's state names (once each has said it runs)."""
    records = paths.host_state_dir() / "kernels"
    found = []
    for rec in sorted(records.glob("*.json")) if records.is_dir() else []:
        assert wait_for(lambda: bool(json.loads(rec.read_text()).get("watcher")), 10), rec  # noqa: B023
        found.append(int(json.loads(rec.read_text())["watcher"][0]))
    return found


def test_gc_sweeps_what_an_exec_kernel_left_when_its_watcher_was_killed_too(
    scene: dict[str, Any], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = start(scene, "exec")
    started = record_started(sc)
    # Kill the kernel's watcher first (whatever this version runs: the records name them), then the kernel.
    for watcher in watchers():
        os.kill(watcher, signal.SIGKILL)
    os.kill(sc.pid, signal.SIGKILL)
    assert wait_for(lambda: sc.pid not in {p.pid for p in running(started)}, 10)
    time.sleep(1.0)
    left = running(started)
    if UNPRIVILEGED:
        assert "squashfuse_ll" in {p.comm for p in left}, left  # the leak this test is about

    dry = {(f["sweeper"], f["target"], f["action"]) for f in cli_json(capsys, "gc", "--dry-run")["findings"]}
    for p in left:
        assert ("kernels", f"pid {p.pid}", "killed") in dry, (p, dry)
    assert running(started) == left  # a dry run kills nothing

    done = cli_json(capsys, "gc")["findings"]
    assert {(f["sweeper"], f["target"]) for f in done} == {(s, t) for s, t, _a in dry}
    assert wait_for(lambda: not running(started), 5), running(started)
    assert not holding(image, scene["since"])
    assert cli_json(capsys, "gc", "--dry-run")["findings"] == []


def test_gc_sweeps_what_an_instance_left_when_its_starter_and_reaper_were_killed(
    scene: dict[str, Any], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = start(scene, "instance")
    record_started(sc)
    (st,) = app_status.list_instances()
    d = app_instance.instance_dir(st.name)
    out = subprocess.run(["pgrep", "-f", f"hpc_kernels.runtimes.apptainer.reaper.* reap {d}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    instance_tree = tree(stat(st.pid)[2])  # type: ignore[index]  # the starter above the instance's process
    assert "squashfuse_ll" in {p.comm for p in instance_tree} or not UNPRIVILEGED, instance_tree
    starter = next(p for p in instance_tree if p.comm == "starter")
    os.kill(starter.pid, signal.SIGKILL)
    assert wait_for(lambda: starter not in running(instance_tree), 10)
    time.sleep(1.0)
    left = [p for p in holding(image, scene["since"]) if p in instance_tree]
    if UNPRIVILEGED:
        assert [p.comm for p in left] == ["squashfuse_ll"], left

    dry = {(f["sweeper"], f["target"], f["action"]) for f in cli_json(capsys, "gc", "--dry-run")["findings"]}
    for p in left:
        assert ("orphans", f"pid {p.pid}", "killed") in dry, (p, dry)
    assert ("instances", st.name, "removed stale state") in dry
    assert [p for p in holding(image, scene["since"]) if p in instance_tree] == left  # a dry run kills nothing

    cli_json(capsys, "gc")
    assert wait_for(lambda: not running(instance_tree), 5), running(instance_tree)
    assert not app_status.instance_dirs()
    # The kernel, attached to an instance that is gone, is an orphan gc ends too.
    assert wait_for(lambda: not running(sc.started or set()), 10), running(sc.started or set())
