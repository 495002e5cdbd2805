"""The places of a build (work directory, private tmpdir, index), who owns them, and sweeping them.

The guard is driven here with a stand-in runtime (a shell that leaves a grandchild behind), so the rules are
proven without Apptainer; tests/real/test_build_kill.py kills real Apptainer builds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import gc, locks, model, paths, procfs, registry
from hpc_kernels.build import guard as buildguard
from hpc_kernels.build import orchestrator
from hpc_kernels.build import temp as buildtemp
from tests.helpers.builders import DEF, FakeBuilder
from tests.helpers.descendants import survivors, tree, wait_until


@pytest.fixture
def entry(make_registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> model.KernelEntry:
    monkeypatch.setenv("APPTAINER_TMPDIR", str(tmp_path / "atmp"))
    (tmp_path / "atmp").mkdir()
    path = make_registry(
        "defaults:\n  images_dir: images\nkernels:\n  sci:\n    def: sci.def\n",
        {"sci.def": DEF, "data/a.txt": "a", "env.yml": "x", "base.sif": "base"},
    )
    found = registry.load_file(path).kernels[0]
    found.image.parent.mkdir(parents=True)
    return found


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def fake_temp(entry: model.KernelEntry, owner: buildtemp.Owner, heartbeat_age: float = 0.0) -> buildtemp.BuildTemp:
    """The places of a build by ``owner`` (as if it had made them and then been killed)."""
    tag = f"{owner.host}-{owner.pid}"
    temp = buildtemp.BuildTemp(
        kernel=entry.name, image=entry.image, workdir=entry.image.parent / f".{entry.image.name}.build-{tag}",
        tmpdir=buildtemp.tmp_base() / f"hpck-build-{os.getuid()}-{entry.name}-{tag}",
        index=buildtemp.index_dir(owner.host) / f"{entry.name}.{owner.pid}.json", owner=owner,
        started_at=time.time())
    text = json.dumps(temp.to_json())
    temp.index.parent.mkdir(parents=True, exist_ok=True)
    temp.index.write_text(text)
    temp.workdir.mkdir()
    temp.record.write_text(text)
    temp.temp_image.write_text("half an image")
    temp.tmpdir.mkdir()
    (temp.tmpdir / "build-temp-123").mkdir()
    (temp.tmpdir / "build-temp-123" / "rootfs").write_text("x" * 1000)
    if heartbeat_age:
        old = time.time() - heartbeat_age
        os.utime(temp.record, (old, old))
        os.utime(temp.workdir, (old, old))
    return temp


def places(temp: buildtemp.BuildTemp) -> list[bool]:
    return [temp.workdir.exists(), temp.tmpdir.exists(), temp.index.exists()]


def test_a_build_works_in_its_own_places_and_removes_them(entry: model.KernelEntry) -> None:
    seen: list[Path] = []

    class Recording(FakeBuilder):
        def build(self, recipe: Path, dest: Path, options: list[str], on_line: Any) -> None:
            seen.extend([dest, Path(os.environ["APPTAINER_TMPDIR"]), Path(os.environ[buildtemp.ENV_RECORD])])
            assert all(p.parent.exists() for p in seen) and seen[1].is_dir()
            super().build(recipe, dest, options, on_line)

    orchestrator.build(entry, builder=Recording())
    dest, tmpdir, record = seen
    host = paths.hostname()
    assert dest.parent.name == f".sci.sif.build-{host}-{os.getpid()}" and dest.parent.parent == entry.image.parent
    assert tmpdir.parent == Path(os.environ["APPTAINER_TMPDIR"]) and tmpdir.name == f"hpck-build-{os.getuid()}-sci-{host}-{os.getpid()}"
    assert record == dest.parent / "owner.json"
    assert not dest.parent.exists() and not tmpdir.exists()
    assert sorted(p.name for p in entry.image.parent.iterdir()) == ["sci.sif", "sci.sif.hpck.json"]
    assert list(buildtemp.index_dir().iterdir()) == []


def test_the_next_build_sweeps_a_killed_build_of_this_host(entry: model.KernelEntry) -> None:
    temp = fake_temp(entry, buildtemp.Owner(paths.hostname(), dead_pid(), 12345, procfs.boot_id()))
    orchestrator.build(entry, builder=FakeBuilder())
    assert places(temp) == [False, False, False]
    log = next(paths.log_dir().glob("build-sci-*.log")).read_text()
    assert f"removed {temp.workdir} (left by a killed build of 'sci'" in log


def test_a_reused_pid_or_another_boot_is_not_the_owner(entry: model.KernelEntry) -> None:
    me = buildtemp.Owner.me()
    assert me.alive()
    assert not buildtemp.Owner(me.host, me.pid, me.start + 1, me.boot).alive()  # same pid, another process
    assert not buildtemp.Owner(me.host, me.pid, me.start, "another-boot").alive()


def test_a_build_that_may_still_run_is_left_alone(entry: model.KernelEntry) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ref = procfs.proc_ref(sleeper.pid)
        assert ref is not None
        running = fake_temp(entry, buildtemp.Owner(paths.hostname(), sleeper.pid, ref.start, procfs.boot_id()))
        # Another host sharing the images directory, heard from a minute ago: its pid cannot be checked here.
        elsewhere = fake_temp(entry, buildtemp.Owner("othernode", 4242, 1, "b"), heartbeat_age=60)
        orchestrator.build(entry, builder=FakeBuilder())
        assert places(running) == [True, True, True]
        assert elsewhere.workdir.exists() and elsewhere.index.exists()
        assert [f for f in gc.sweep(sweepers=("hpc_kernels.build.temp:sweep",))] == []
        assert places(running) == [True, True, True] and elsewhere.workdir.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_silent_build_on_another_host_is_swept_but_not_its_node_local_tmpdir(entry: model.KernelEntry) -> None:
    temp = fake_temp(entry, buildtemp.Owner("othernode", 4242, 1, "b"), heartbeat_age=buildtemp.STALE_AFTER + 60)
    found = gc.sweep(dry_run=True, sweepers=("hpc_kernels.build.temp:sweep",))
    assert [(f.sweeper, f.target, f.action) for f in found] == [("builds", str(temp.workdir), "removed")]
    assert "othernode" in found[0].reason and "no sign of life" in found[0].reason
    assert places(temp) == [True, True, True]  # a dry run changes nothing
    gc.sweep(sweepers=("hpc_kernels.build.temp:sweep",))
    # The tmpdir path names a directory of *that* node's disk; here it is someone else's: never touched.
    assert places(temp) == [False, True, False]


def test_gc_sweeps_a_killed_build_of_this_host(entry: model.KernelEntry) -> None:
    temp = fake_temp(entry, buildtemp.Owner(paths.hostname(), dead_pid(), 1, procfs.boot_id()))
    found = gc.sweep(dry_run=True)
    mine = [(f.target, f.action) for f in found if f.sweeper == "builds"]
    assert mine == [(str(temp.workdir), "removed"), (str(temp.tmpdir), "removed")]
    assert places(temp) == [True, True, True]
    gc.sweep()
    assert places(temp) == [False, False, False]


def test_gc_removes_the_build_lock_a_killed_build_left_but_not_a_live_one(entry: model.KernelEntry) -> None:
    """Before: a SIGKILLed build's ``.IMAGE.build-lock`` stayed in the images directory until the next build."""
    pid = dead_pid()
    temp = fake_temp(entry, buildtemp.Owner(paths.hostname(), pid, 1, procfs.boot_id()))
    lock = buildtemp.image_lock(entry.image)
    dead = locks.LockRecord(paths.hostname(), pid, 1, procfs.boot_id(), os.getuid(), "me", time.time(), "t0k")
    lock.write_text(dead.to_text())
    found = [(f.target, f.action) for f in gc.sweep(dry_run=True) if f.sweeper == "builds"]
    assert (str(lock), "removed") in found and lock.exists()
    gc.sweep()
    assert not lock.exists() and places(temp) == [False, False, False]
    # A lock whose holder lives (this process) is not a leftover, whoever's build record is swept.
    temp = fake_temp(entry, buildtemp.Owner(paths.hostname(), dead_pid(), 1, procfs.boot_id()))
    with locks.cluster_lock(lock, wait=False):
        found = [(f.target, f.action) for f in gc.sweep() if f.sweeper == "builds"]
        assert str(lock) not in [target for target, _ in found] and lock.exists()
    assert not lock.exists() and places(temp) == [False, False, False]


def test_a_crafted_record_cannot_make_gc_remove_other_directories(entry: model.KernelEntry, tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    temp = fake_temp(entry, buildtemp.Owner(paths.hostname(), dead_pid(), 1, procfs.boot_id()))
    for key in ("workdir", "tmpdir"):
        data = json.loads(temp.index.read_text())
        data[key] = str(victim)
        temp.index.write_text(json.dumps(data))
        gc.sweep()
        assert (victim / "thesis.tex").exists()


# ----------------------------------------------------------------------------- the guard

OWNER = textwrap.dedent("""\
    import os, subprocess, sys, time
    from pathlib import Path
    from hpc_kernels.build import guard as buildguard
    from hpc_kernels.build import temp as buildtemp
    image = Path(sys.argv[1])
    temp = buildtemp.create("sci", image)
    env = dict(os.environ, **{buildtemp.ENV_RECORD: str(temp.record)})
    # A stand-in runtime: a child that leaves a grandchild running (like apptainer -> mksquashfs).
    runtime = ["/bin/sh", "-c", "sleep 300 & sleep 300"]
    guard = subprocess.Popen([*buildguard.argv(), *runtime], env=env)
    print(guard.pid, flush=True)
    if sys.argv[2] == "cancel":
        time.sleep(1)
        buildtemp.cancel(temp)
        print("guard done" if buildtemp.wait_for_guard(temp) else "guard busy", guard.wait(), flush=True)
    time.sleep(300)
""")


@pytest.mark.parametrize("how", ["pid", "group", "cancel"])
def test_the_guard_kills_the_build_when_its_owner_dies_or_cancels(entry: model.KernelEntry, tmp_path: Path,
                                                                   how: str) -> None:
    out = tmp_path / "owner.out"
    with out.open("w") as fh:
        owner = subprocess.Popen([sys.executable, "-c", OWNER, str(entry.image), how], stdout=fh,
                                 start_new_session=True)
    try:
        assert wait_until(lambda: out.read_text().strip() != "", 30) < 30
        guard = int(out.read_text().split()[0])
        assert wait_until(lambda: len(tree(guard)) >= 3, 30) < 30  # sh and its two sleeps
        below = tree(guard)
        assert os.getsid(guard) == guard  # its own session: a kill of the owner's group does not reach it
        temp = buildtemp.load(next(buildtemp.index_dir().iterdir()))
        if how == "pid":
            os.kill(owner.pid, signal.SIGKILL)
        elif how == "group":
            os.killpg(owner.pid, signal.SIGKILL)
        took = wait_until(lambda: not survivors(below), 10)
        assert survivors(below) == [] and took < 5
        if how == "cancel":
            # The owner lives: it was told when the guard was done, and removes the places itself.
            assert wait_until(lambda: "guard" in out.read_text(), 10) < 10
            assert out.read_text().split()[1:] == ["guard", "done", str(128 + signal.SIGKILL)]
            assert temp.tmpdir.exists()
        else:
            # The owner is dead: the guard removed the places (the index last).
            assert wait_until(lambda: not temp.index.exists(), 10) < 10
            assert places(temp) == [False, False, False]
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()


def test_without_a_build_record_the_guard_is_the_runtime(tmp_path: Path) -> None:
    done = subprocess.run([*buildguard.argv(), "/bin/sh", "-c", "echo $$; exit 3"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != buildtemp.ENV_RECORD})
    assert done.returncode == 3 and done.stdout.strip().isdigit()


def test_an_unwritable_temporary_directory_is_one_sentence(entry: model.KernelEntry, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    locked_dir = tmp_path / "readonly"
    locked_dir.mkdir(mode=0o500)
    monkeypatch.setenv("APPTAINER_TMPDIR", str(locked_dir / "sub"))
    if os.access(locked_dir, os.W_OK):
        pytest.skip("running as root: permissions do not stop us")
    with pytest.raises(orchestrator.BuildError, match=r"cannot prepare the build's temporary files in .*readonly/sub"):
        orchestrator.build(entry, builder=FakeBuilder())
    assert list(buildtemp.index_dir().iterdir()) == []  # nothing half-made is left behind
