"""The exec-mode watcher, without Apptainer: the real launcher ``exec``s a stand-in runtime that leaves what
Apptainer leaves (a helper in the launcher's session, a daemonised child carrying the kernel's marker), and
the watcher must clean up on every exit path; ``gc`` finishes the job of a watcher that was killed too.

tests/real/test_leftovers.py does the same with the real Apptainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc_kernels import cli, gc, paths, procfs
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.apptainer import execrecord as app_execrecord
from hpc_kernels.runtimes.apptainer import sweep as app_sweep
from tests.helpers.proctree import Proc, kill_all, running, tree, wait_for

#: Stands in for Apptainer: a helper left in the session (like squashfuse_ll, without the marker), a child
#: that leaves the session (daemonised) but carries the kernel's marker, as the container passes it on;
#: then it becomes the "kernel" itself, keeping the launcher's pid (as Apptainer's starter does).
FAKE_RUNTIME = """#!/bin/sh
HPC_KERNELS_KERNEL_ID="$APPTAINERENV_HPC_KERNELS_KERNEL_ID"
export HPC_KERNELS_KERNEL_ID
env -u HPC_KERNELS_KERNEL_ID sleep 300 &
setsid sleep 301 &
exec sleep 302
"""
#: Starts the launcher as jupyter_client does (its own session, $JPY_PARENT_PID), says its pid, lives on.
PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, JPY_PARENT_PID=str(os.getpid())) if os.environ.get("AS_JUPYTER") else None
p = subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL, env=env)
print(p.pid, flush=True)
p.wait()
time.sleep(3600)
"""
GONE_WITHIN = 8.0


@dataclass
class Launched:
    parent: subprocess.Popen[str]
    launcher: int
    started: set[Proc]


@pytest.fixture
def launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Launched]]:
    """Start a kernel of a kernelspec whose runtime is FAKE_RUNTIME, under a parent process of its own
    (which sets $JPY_PARENT_PID as jupyter_client does, unless not ``as_jupyter``)."""
    from hpc_kernels.kernelspec import launcher_argv

    fake = tmp_path / "apptainer"
    fake.write_text(FAKE_RUNTIME)
    fake.chmod(0o755)
    image = tmp_path / "img.sif"
    image.write_text("")
    spec = LaunchSpec(kernel="fake", runtime="apptainer", mode="exec", image=str(image),
                      command=("python3", "-f", "{connection_file}"), gpu="none")
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"metadata": {"hpc_kernels": spec.to_json()}}))
    # gc here must not judge the Docker/Podman containers of other tests of this user (not ours to remove).
    monkeypatch.setenv("HPC_KERNELS_PODMAN", "/nonexistent/podman")
    monkeypatch.setenv("HPC_KERNELS_DOCKER", "/nonexistent/docker")
    launched: list[Launched] = []

    def start(as_jupyter: bool = True) -> Launched:
        argv = [*launcher_argv(), str(spec_file), str(tmp_path / "connection.json")]
        # The stand-in is the launcher's runtime only (gc here still finds no apptainer: nothing to list).
        env = {**os.environ, "AS_JUPYTER": "1" if as_jupyter else "", "HPC_KERNELS_APPTAINER": str(fake)}
        parent = subprocess.Popen([sys.executable, "-c", PARENT, *argv], stdout=subprocess.PIPE, text=True,
                                  env=env)
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        # Wait until the stand-in has started its children and the watcher has seen them.
        assert wait_for(lambda: len(tree(pid)) == 3 and _watched(), 10), tree(pid)
        one = Launched(parent, pid, tree(pid))
        assert sorted(p.comm for p in one.started) == ["sleep", "sleep", "sleep"]
        launched.append(one)
        return one

    yield start
    for one in launched:
        if one.parent.poll() is None:
            one.parent.kill()
            one.parent.wait()
        kill_all(running(one.started))
    for path in app_execrecord.record_paths():
        record = app_execrecord.read_record(path)
        if record and record.watcher:
            procfs.kill([record.watcher])


def _watched() -> bool:
    """The watcher runs and has recorded the launcher's two children."""
    paths_ = app_execrecord.record_paths()
    if len(paths_) != 1:
        return False
    record = app_execrecord.read_record(paths_[0])
    return record is not None and record.watcher is not None and len(record.procs) == 2


def test_sigkill_of_the_launcher_leaves_nothing(launch: Callable[..., Launched]) -> None:
    one = launch()
    os.kill(one.launcher, signal.SIGKILL)
    assert wait_for(lambda: not running(one.started), GONE_WITHIN), running(one.started)
    assert wait_for(lambda: not app_execrecord.record_paths(), GONE_WITHIN)
    assert "killed what it left" in (paths.log_dir() / "watcher.log").read_text()


def test_sigkill_of_the_process_group_leaves_nothing(launch: Callable[..., Launched]) -> None:
    one = launch()
    os.killpg(one.launcher, signal.SIGKILL)
    assert wait_for(lambda: not running(one.started), GONE_WITHIN), running(one.started)
    assert wait_for(lambda: not app_execrecord.record_paths(), GONE_WITHIN)


def test_the_kernel_ends_when_the_process_that_started_it_dies(launch: Callable[..., Launched]) -> None:
    one = launch()
    one.parent.kill()
    one.parent.wait()
    assert wait_for(lambda: not running(one.started), GONE_WITHIN), running(one.started)
    assert wait_for(lambda: not app_execrecord.record_paths(), GONE_WITHIN)
    assert "the process that started it" in (paths.log_dir() / "watcher.log").read_text()


def test_a_kernel_started_to_outlive_its_starter_lives_on(launch: Callable[..., Launched]) -> None:
    """Without $JPY_PARENT_PID (not started by jupyter_client) a kernel does not end with its starter, as a
    host ipykernel does not; it still leaves nothing when it ends."""
    one = launch(as_jupyter=False)
    record = app_execrecord.read_record(app_execrecord.record_paths()[0])
    assert record is not None and record.parent is None
    one.parent.kill()
    one.parent.wait()
    time.sleep(1.5)
    assert len(running(one.started)) == 3
    os.kill(one.launcher, signal.SIGKILL)
    assert wait_for(lambda: not running(one.started), GONE_WITHIN), running(one.started)


def test_the_watcher_runs_detached_and_isolated(launch: Callable[..., Launched]) -> None:
    one = launch()
    record = app_execrecord.read_record(app_execrecord.record_paths()[0])
    assert record is not None and record.watcher is not None
    assert record.launcher.pid == one.launcher and record.session
    assert record.parent is not None and record.parent.pid == one.parent.pid
    pid = record.watcher.pid
    # Its own session: jupyter_client's SIGKILL of the launcher's group cannot reach it; nobody's child.
    assert os.getsid(pid) not in (os.getsid(one.launcher), os.getsid(0))
    assert os.getpgid(pid) != os.getpgid(one.launcher)
    assert procfs.info(pid).ppid not in (one.launcher, one.parent.pid)  # type: ignore[union-attr]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-I", b"-S"]


def test_gc_finishes_what_a_killed_watcher_left(launch: Callable[..., Launched], capsys: pytest.CaptureFixture[str]) -> None:
    one = launch()
    (path,) = app_execrecord.record_paths()
    record = app_execrecord.read_record(path)
    assert record is not None and record.watcher is not None
    procfs.kill([record.watcher])
    os.kill(one.launcher, signal.SIGKILL)
    assert wait_for(lambda: len(running(one.started)) == 2, 5), running(one.started)
    left = running(one.started)

    capsys.readouterr()
    assert cli.main(["gc", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)["findings"]
    targets = {(f["sweeper"], f["target"], f["action"]) for f in dry}
    assert {("kernels", f"pid {p.pid}", "killed") for p in left} <= targets, (left, dry)
    assert ("kernels", f"fake ({record.id})", "removed its record") in targets
    assert running(one.started) == left and app_execrecord.record_paths() == [path]

    assert cli.main(["gc"]) == 0
    assert "killed" in capsys.readouterr().err
    assert wait_for(lambda: not running(one.started), 5), running(one.started)
    assert app_execrecord.record_paths() == []
    assert [f for f in gc.sweep(dry_run=True) if f.sweeper == "kernels"] == []


def test_gc_gives_a_live_kernel_whose_watcher_died_a_new_one(launch: Callable[..., Launched]) -> None:
    one = launch()
    (path,) = app_execrecord.record_paths()
    record = app_execrecord.read_record(path)
    assert record is not None and record.watcher is not None
    procfs.kill([record.watcher])
    assert wait_for(lambda: not record.watcher.alive(), 5)  # type: ignore[union-attr]
    found = app_sweep.sweep_kernels(dry_run=False)
    assert [(f.sweeper, f.action) for f in found] == [("kernels", "restarted its watcher")]
    assert wait_for(lambda: (app_execrecord.read_record(path) or record).watcher not in (None, record.watcher), 10)
    os.kill(one.launcher, signal.SIGKILL)  # ... and the new watcher cleans up after it
    assert wait_for(lambda: not running(one.started), GONE_WITHIN), running(one.started)


# ----------------------------------------------------------------------------- records and procfs


def test_record_round_trip_and_damage(tmp_path: Path) -> None:
    rec = app_execrecord.KernelRecord(id="ab", kernel="k", image="/i.sif", launcher=procfs.ProcRef(10, 5),
                               session=True, parent=None, created=1.0, watcher=procfs.ProcRef(11, 6),
                               procs=((procfs.ProcRef(12, 7), "squashfuse_ll"),))
    path = str(tmp_path / "ab.json")
    app_execrecord.write_record(rec, path)
    assert app_execrecord.read_record(path) == rec
    assert os.listdir(tmp_path) == ["ab.json"]  # no temporary file left
    for bad in ({"format": 1}, {"format": 2}, [], {**rec.to_json(), "launcher": ["x", 1]},
                {**rec.to_json(), "procs": [[1, 2]]}):
        Path(path).write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            app_execrecord.read_record(path)
    assert app_execrecord.read_record(str(tmp_path / "gone.json")) is None


def test_gc_removes_a_damaged_record() -> None:
    directory = Path(app_execrecord.records_path())
    directory.mkdir(parents=True)
    (directory / "junk.json").write_text("{not json")
    found = app_sweep.sweep_kernels(dry_run=True)
    assert [(f.target, f.action) for f in found] == [(str(directory / "junk.json"), "removed")]
    assert (directory / "junk.json").exists()
    app_sweep.sweep_kernels()
    assert not (directory / "junk.json").exists()


def test_session_leftovers_only_once_the_leader_has_ended(tmp_path: Path) -> None:
    helper = tmp_path / "squashfuse_ll"
    helper.symlink_to("/bin/sleep")  # comm is the name it was run by
    leader = subprocess.Popen(["sh", "-c", f"{helper} 300 & sleep 300 & wait"], start_new_session=True)
    try:
        assert wait_for(lambda: len(procfs.session(leader.pid)) == 3, 5)
        ref = procfs.proc_ref(leader.pid)
        assert ref is not None
        assert procfs.session_leftovers(ref) == []  # the leader lives: nothing is left over
        leader.kill()
        assert wait_for(lambda: ref.ended(), 5)  # a zombie of ours: still the same process
        left = procfs.session_leftovers(ref)
        assert sorted(p.comm for p in left) == ["sleep", "squashfuse_ll"]
        assert [p.comm for p in procfs.session_leftovers(ref, helpers_only=True)] == ["squashfuse_ll"]
        leader.wait()  # reaped: the pid is free, the session still pinned by its members
        assert len(procfs.session_leftovers(ref)) == 2
        assert sorted(procfs.kill(p.ref for p in left)) == sorted(p.pid for p in left)
        assert wait_for(lambda: not procfs.session(ref.pid), 5)
        assert not procfs.ProcRef(ref.pid, ref.start + 1).ended() or procfs.info(ref.pid) is None
    finally:
        for p in procfs.session(leader.pid):
            os.kill(p.pid, signal.SIGKILL)
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_kill_spares_a_recycled_pid() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        ref = procfs.proc_ref(child.pid)
        assert ref is not None
        assert procfs.kill([procfs.ProcRef(child.pid, ref.start + 1)]) == []
        assert child.poll() is None
        assert procfs.kill([ref]) == [child.pid]
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_marked_finds_processes_by_their_environment() -> None:
    token = os.urandom(4).hex()
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, app_execrecord.ENV_KERNEL: token})
    try:
        assert wait_for(lambda: procfs.marked(app_execrecord.ENV_KERNEL, token) == [child.pid], 5)
        assert procfs.marked(app_execrecord.ENV_KERNEL, token + "x") == []
    finally:
        child.kill()
        child.wait()


def test_descendants_are_found_through_every_thread() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        assert wait_for(lambda: len(procfs.descendants(parent.pid)) == 2, 5)
        assert {p.comm for p in procfs.descendants(parent.pid)} == {"sleep"}
        assert parent.pid in {p.pid for p in procfs.descendants(os.getpid())}  # (fixtures may run others)
    finally:
        for p in procfs.descendants(parent.pid):
            os.kill(p.pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_launch_path_stays_light() -> None:
    """The launcher's exec path (with the watcher's launch side) imports no pathlib, socket, subprocess or
    tempfile: each costs milliseconds on every kernel start under ``python -S``."""
    from hpc_kernels.kernelspec import launcher_argv

    python, *flags, script = launcher_argv()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import hpc_kernels.launch, hpc_kernels.runtimes.apptainer.watcher, "
            "hpc_kernels.runtimes.apptainer; "
            "print(sorted({'pathlib', 'socket', 'subprocess', 'tempfile', 'typing'} & set(sys.modules)))")
    done = subprocess.run([python, *flags, "-c", code, str(Path(script).parent.parent)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert paths.host_state_path() == str(paths.host_state_dir())
