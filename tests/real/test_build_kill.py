"""A killed build leaves nothing behind: real Apptainer builds (unprivileged: a user namespace), killed mid-way.

Each test starts ``hpc-kernels build`` in its own session, waits for a phase of the build (``%post`` running,
or ``mksquashfs`` packing the image), snapshots every process below it, kills it one way or another, then
checks, within bounded times, that none of those processes lives on, that nothing appears in the images
directory afterwards (an orphaned ``apptainer build`` used to write its temporary SIF there ~40 s later),
and that Apptainer's temporary directory ends up empty (the build itself, the next build or ``gc`` clean it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.descendants import survivors, tree, wait_until

pytestmark = pytest.mark.apptainer

#: Random data (incompressible: mksquashfs takes a while on it) then a pause, so each phase can be caught.
DEF = """\
Bootstrap: localimage
From: {base}

%post
    dd if=/dev/urandom of=/opt/blob bs=1M count=150 status=none
    sleep 4
"""

#: How long the build's processes may outlive the kill.
DIE_WITHIN = 10.0
#: How long the temporary files may outlive the kill when the build's own guard cleans them.
CLEAN_WITHIN = 20.0


@pytest.fixture
def project(make_registry: Any, base_sif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # A private APPTAINER_TMPDIR: whatever the build leaves in it is this test's, and only this test's.
    atmp = tmp_path / "apptainer-tmp"
    atmp.mkdir()
    monkeypatch.setenv("APPTAINER_TMPDIR", str(atmp))
    return make_registry(  # type: ignore[no-any-return]
        """\
        defaults:
          images_dir: images
          compression: gzip
          command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
        kernels:
          slow:
            def: slow.def
        """,
        {"slow.def": DEF.format(base=base_sif)},
    )


def start_build(project: Path, log: Path) -> subprocess.Popen[bytes]:
    """``hpc-kernels build slow`` as the leader of its own session and process group."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hpc_kernels", "build", "slow", "--registry", str(project)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_for_phase(cli: subprocess.Popen[bytes], phase: str, log: Path) -> dict[int, tuple[str, int]]:
    """Block until the build is in ``phase`` (post | mksquashfs); the process tree at that moment."""
    def reached() -> bool:
        procs = tree(cli.pid)
        if phase == "mksquashfs":
            return any(comm == "mksquashfs" for comm, _start in procs.values())
        # %post's `sleep` runs: the root file system is unpacked and written to, the image not yet packed.
        return any(comm == "sleep" for comm, _start in procs.values())

    waited = wait_until(lambda: reached() or cli.poll() is not None, 240, step=0.1)
    assert cli.poll() is None, f"the build ended before {phase}: {log.read_text(errors='replace')[-2000:]}"
    assert waited < 240, f"the build never reached {phase}"
    snapshot = tree(cli.pid)
    assert snapshot, "no build processes seen"
    return snapshot


def images_entries(project: Path, locks: bool = False) -> list[str]:
    """What the images directory holds (besides the build lock, unless ``locks``: a killed build leaves its
    lock file, which the next build or ``gc`` removes)."""
    images = project.parent / "images"
    if not images.is_dir():
        return []
    return sorted(p.name for p in images.iterdir() if locks or not p.name.endswith(".build-lock"))


def leftovers(atmp: Path) -> list[str]:
    return sorted(p.name for p in atmp.iterdir())


def hard_kill(cli: subprocess.Popen[bytes], snapshot: dict[int, tuple[str, int]]) -> None:
    """SIGKILL every process of the build at once, wherever it is (as the OOM killer or a node reboot would)."""
    for pid in [cli.pid, *snapshot]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cli.wait(10)


def hk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True, timeout=600)


def test_sigkill_of_the_build_pid_during_mksquashfs(project: Path, tmp_path: Path) -> None:
    atmp = Path(os.environ["APPTAINER_TMPDIR"])
    log = tmp_path / "build.log"
    cli = start_build(project, log)
    try:
        snapshot = wait_for_phase(cli, "mksquashfs", log)
    finally:
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
    # Past the point where an orphaned `apptainer build` would have finished the SIF (bounded: 180 s).
    lived = wait_until(lambda: not survivors(snapshot), 180)
    late = survivors(snapshot)
    wait_until(lambda: not leftovers(atmp), CLEAN_WITHIN)
    assert images_entries(project) == [], "an image landed in the images directory after its build was killed"
    assert late == [] and lived < DIE_WITHIN, f"build processes outlived the kill by {lived:.1f} s: {late}"
    assert leftovers(atmp) == []


def test_sigkill_of_the_process_group_during_post(project: Path, tmp_path: Path) -> None:
    atmp = Path(os.environ["APPTAINER_TMPDIR"])
    log = tmp_path / "build.log"
    cli = start_build(project, log)
    try:
        snapshot = wait_for_phase(cli, "post", log)
    finally:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait(10)
    lived = wait_until(lambda: not survivors(snapshot), 180)
    assert survivors(snapshot) == [] and lived < DIE_WITHIN, f"build processes outlived the kill by {lived:.1f} s"
    cleaned = wait_until(lambda: not leftovers(atmp), CLEAN_WITHIN)
    assert leftovers(atmp) == [], f"Apptainer's temporary files stayed {cleaned:.0f} s after the kill"
    assert images_entries(project) == []


def test_ctrl_c_stops_the_build_and_removes_its_files(project: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches hpc-kernels (the foreground process group), which stops the build through its
    guard, removes what the build made and exits 130."""
    atmp = Path(os.environ["APPTAINER_TMPDIR"])
    log = tmp_path / "build.log"
    cli = start_build(project, log)
    try:
        snapshot = wait_for_phase(cli, "post", log)
    finally:
        os.kill(cli.pid, signal.SIGINT)
    assert cli.wait(30) == 130, log.read_text(errors="replace")
    lived = wait_until(lambda: not survivors(snapshot), 60)
    assert survivors(snapshot) == [] and lived < DIE_WITHIN
    assert leftovers(atmp) == [] and images_entries(project) == []  # gone by the time it exited
    assert "Traceback" not in log.read_text(errors="replace")


def test_what_a_hard_kill_leaves_is_swept_by_gc_and_by_the_next_build(project: Path, tmp_path: Path) -> None:
    """Every process of the build SIGKILLed at once (the guard too, as the OOM killer or a node reboot would):
    ``gc --dry-run`` names what is left, ``gc`` removes it; the next build starts clean and succeeds."""
    atmp = Path(os.environ["APPTAINER_TMPDIR"])
    log = tmp_path / "build.log"
    cli = start_build(project, log)
    snapshot: dict[int, tuple[str, int]] = {}
    try:
        snapshot = wait_for_phase(cli, "post", log)
    finally:
        hard_kill(cli, snapshot)
    wait_until(lambda: not survivors(snapshot), 60)
    assert survivors(snapshot) == []
    time.sleep(1)
    left = leftovers(atmp) + images_entries(project)
    assert left, "a hard kill should leave Apptainer's temporary files (else this test proves nothing)"

    dry = hk("gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    named = [f for f in json.loads(dry.stdout)["findings"] if f["sweeper"] == "builds"]
    assert named and all(f["action"] == "removed" for f in named), dry.stdout
    assert leftovers(atmp) + images_entries(project) == left  # a dry run removes nothing

    assert images_entries(project, locks=True) == [".slow.sif.build-lock", *images_entries(project)]
    done = hk("gc")
    assert done.returncode == 0, done.stderr
    assert leftovers(atmp) == [] and images_entries(project, locks=True) == [], done.stderr

    # A second hard kill; this time the next build of the image sweeps, then builds.
    cli = start_build(project, log)
    snapshot: dict[int, tuple[str, int]] = {}
    try:
        snapshot = wait_for_phase(cli, "post", log)
    finally:
        hard_kill(cli, snapshot)
    wait_until(lambda: not survivors(snapshot), 60)
    assert leftovers(atmp) + images_entries(project)
    done = hk("build", "slow", "--registry", str(project))
    assert done.returncode == 0, done.stderr
    assert leftovers(atmp) == []
    assert images_entries(project, locks=True) == ["slow.sif", "slow.sif.hpck.json"]
