"""The leftover checks can fail: each kind of check (tests/helpers/leaks.py) catches a deliberately leaked thing.

Every real-component test runs under the ``no_leftovers`` fixture (tests/real/conftest.py); these tests leak one
thing of each kind on purpose, show that the check names it, then remove it and show the check is clean.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import leaks

pytestmark = pytest.mark.leaks_ok

TEST_IMAGE = "localhost/hpck-test:bookworm"


def caught(before: set[leaks.Thing], kind: str, homes: tuple[str, ...] = (), contains: str = "") -> leaks.Thing:
    """The leaked thing of ``kind`` (whose description holds ``contains``) that the check reports; then
    removes all leftovers and checks again."""
    left = leaks.leftovers(before, homes, settle=0)
    found = [t for t in left if t.kind == kind and contains in str(t)]
    try:
        assert found, f"the check missed a leaked {kind}; it saw: {sorted(left)}"
        return found[0]
    finally:
        # Only what this test leaked: other processes of this user may be running (a developer's shell).
        leaks.remove(found, homes, mine=True)
        assert not set(found) & leaks.leftovers(before, homes, settle=20)


def _wait(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.2)


def test_a_process_left_running_in_its_own_session_is_caught() -> None:
    before = leaks.snapshot()
    unique = f"sleep 300.{secrets.randbelow(10**6)}"  # a duration no other process has
    subprocess.Popen(["setsid", *unique.split()], start_new_session=True)
    _wait(lambda: any(unique in t.detail for t in leaks.processes() - before))
    assert unique in caught(before, "process", contains=unique).detail


@pytest.mark.apptainer
def test_a_squashfuse_left_by_a_killed_apptainer_is_caught(apptainer_bin: str, base_sif: Path) -> None:
    """SIGKILL of a bare ``apptainer exec`` (unprivileged) orphans its squashfuse_ll: Apptainer's own leak."""
    if os.getuid() == 0:
        pytest.skip("as root Apptainer mounts with the kernel's squashfs: no squashfuse to leak")
    before = leaks.snapshot()
    proc = subprocess.Popen([apptainer_bin, "exec", str(base_sif), "sleep", "300"])
    _wait(lambda: any(t.kind == "squashfuse" for t in leaks.processes() - before))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught(before, "squashfuse").kind == "squashfuse"


@pytest.mark.apptainer
def test_a_running_starter_is_caught(apptainer_bin: str, base_sif: Path) -> None:
    before = leaks.snapshot()
    proc = subprocess.Popen([apptainer_bin, "exec", str(base_sif), "sleep", "300"], start_new_session=True)
    _wait(lambda: any(t.kind == "starter" for t in leaks.processes() - before))
    try:
        assert caught(before, "starter")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.apptainer
def test_a_fuse_mount_is_caught(tmp_path: Path) -> None:
    if not (shutil.which("squashfuse") and shutil.which("mksquashfs")):
        pytest.skip("squashfuse and squashfs-tools are needed (bash .ci/run installs them)")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text("x")
    image, mnt = tmp_path / "t.sqfs", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mksquashfs", str(tmp_path / "tree"), str(image), "-quiet", "-noappend"], check=True)
    before = leaks.snapshot()
    subprocess.run(["squashfuse", str(image), str(mnt)], check=True, timeout=30)
    assert caught(before, "mount", contains=str(mnt)).ident == str(mnt)


@pytest.mark.apptainer
def test_an_instance_is_caught(apptainer_bin: str, base_sif: Path, isolated_home: Path) -> None:
    homes = (str(isolated_home),)
    before = leaks.snapshot(homes)
    name = f"leak-{secrets.token_hex(3)}"
    subprocess.run([apptainer_bin, "instance", "start", str(base_sif), name], check=True, timeout=120,
                   capture_output=True)
    assert caught(before, "instance", homes, contains=name).ident.startswith(name)


@pytest.mark.podman
def test_a_podman_container_is_caught() -> None:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (bash .ci/podman-setup.sh installs it)")
    before = leaks.snapshot()
    name = f"leak-{secrets.token_hex(3)}"
    subprocess.run(["podman", "run", "-d", "--network=host", "--name", name, TEST_IMAGE, "sleep", "300"],
                   check=True, timeout=120, capture_output=True)
    assert caught(before, "container", contains=name).detail == name


@pytest.mark.docker
def test_a_docker_container_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (shutil.which("docker") and os.path.exists("/run/docker.sock")):
        pytest.skip("no Docker Engine (bash .ci/docker-setup.sh starts dockerd)")
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/docker.sock")
    before = leaks.snapshot()
    name = f"leak-{secrets.token_hex(3)}"
    subprocess.run(["docker", "run", "-d", "--network=host", "--name", name, TEST_IMAGE, "sleep", "300"],
                   check=True, timeout=120, capture_output=True)
    assert caught(before, "container", contains=name).detail == name


@pytest.mark.slurm
def test_a_slurm_job_is_caught(tmp_path: Path) -> None:
    if not shutil.which("sbatch"):
        pytest.skip("Slurm is not installed (bash .ci/lmod-slurm-setup.sh installs it)")
    before = leaks.snapshot()
    job = subprocess.run(["sbatch", "--parsable", "-t", "5", "-o", str(tmp_path / "o"), "--wrap", "sleep 300"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip().split(";")[0]
    assert caught(before, "job", contains=job).ident == job


@pytest.mark.apptainer
def test_a_build_temporary_is_caught() -> None:
    before = leaks.snapshot()
    path = Path(f"/tmp/build-temp-{secrets.token_hex(4)}")
    path.mkdir()
    assert caught(before, "tmp", contains=str(path)).ident == str(path)


@pytest.mark.apptainer
def test_a_private_build_tmpdir_is_caught() -> None:
    before = leaks.snapshot()
    path = Path(f"/tmp/hpck-build-leak-vm-{secrets.token_hex(4)}")
    path.mkdir()
    assert caught(before, "tmp", contains=str(path)).ident == str(path)
