"""The test bed is a small DRAC: these tests prove each of its promises, so a green CI means "works for a
DRAC user" — an unprivileged user whose Apptainer mounts with squashfuse, rootless Podman, a real Docker
Engine, a compute node without internet, and a group-shared /project.

They run only on the test bed that ``.ci/run`` builds (``HPCK_TESTBED=1``); elsewhere they skip, and in CI a
skip is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import leaks

LOGIN_NODE = os.environ.get("HPCK_LOGIN_ADDR", "10.250.0.1")


@pytest.fixture(scope="module")
def testbed() -> None:
    if os.environ.get("HPCK_TESTBED") != "1":
        pytest.skip("not on the small-DRAC test bed (bash .ci/run builds it and sets HPCK_TESTBED=1)")


def sh(*argv: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.apptainer
def test_tests_run_unprivileged_and_apptainer_mounts_with_squashfuse(testbed: None, base_sif: Path,
                                                                      apptainer_bin: str) -> None:
    assert os.getuid() != 0 and os.geteuid() != 0
    before = leaks.processes()
    proc = subprocess.Popen([apptainer_bin, "exec", str(base_sif), "sleep", "30"])
    try:
        deadline = time.monotonic() + 30
        seen: set[leaks.Thing] = set()
        while time.monotonic() < deadline and not seen:
            seen = {t for t in leaks.processes() - before if t.kind == "squashfuse"}
            time.sleep(0.1)
        assert seen, "Apptainer did not mount the SIF with squashfuse (is it running as root?)"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.podman
def test_podman_is_rootless(testbed: None) -> None:
    info = json.loads(sh("podman", "info", "--format", "json").stdout)
    assert info["host"]["security"]["rootless"] is True


@pytest.mark.docker
def test_docker_is_a_real_docker_engine(testbed: None) -> None:
    docker = shutil.which("docker")
    assert docker == "/usr/bin/docker", f"the docker CLI must be Debian's docker.io, not {docker}"
    info = json.loads(sh(docker, "version", "--format", "{{json .Server}}",
                         env={**os.environ, "DOCKER_HOST": "unix:///run/docker.sock"}).stdout)
    assert any(c.get("Name") == "Engine" for c in info.get("Components", [])), info
    assert "podman" not in json.dumps(info).lower()


@pytest.mark.slurm
def test_a_job_on_the_compute_node_reaches_the_login_node_and_nothing_else(testbed: None, tmp_path: Path) -> None:
    """Narval/Rorqual: no route beyond the login node. No packet leaves: the kernel refuses the connect
    (ENETUNREACH) because the compute node's namespace has no route for it."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import errno, json, socket, urllib.request
out = {{"host": socket.gethostname()}}
try:
    urllib.request.urlopen("http://pypi.org/simple/", timeout=5)
    out["internet"] = "reached"
except OSError as exc:
    out["internet"] = f"failed: {{exc}}"
try:
    socket.create_connection(("203.0.113.7", 80), timeout=5).close()  # TEST-NET-3, never routed
    out["route"] = "connected"
except OSError as exc:
    out["route"] = errno.errorcode.get(exc.errno or 0, str(exc))
with socket.create_connection(("{LOGIN_NODE}", 6817), timeout=5):  # slurmctld on the login node
    out["login"] = "ok"
print(json.dumps(out))
""")
    res = sh("sbatch", "--wait", "--parsable", "-t", "2", "-o", str(tmp_path / "out"),
             "--wrap", f"python3 {probe}", timeout=120)
    assert res.returncode == 0, res.stderr + (tmp_path / "out").read_text()
    seen = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
    assert seen["host"] == "compute"
    assert seen["internet"].startswith("failed"), seen
    assert seen["route"] == "ENETUNREACH", seen
    assert seen["login"] == "ok"


def test_two_users_share_the_group_project(testbed: None, tmp_path: Path) -> None:
    project = Path(os.environ.get("HPCK_PROJECT", "/project/def-hpck"))
    group = os.environ.get("HPCK_GROUP", "hpck-grp")
    other = os.environ.get("HPCK_USER2", "hpck-b")
    st = project.stat()
    assert st.st_mode & 0o2000 and (st.st_mode & 0o777) == 0o770, oct(st.st_mode)
    import grp

    assert grp.getgrgid(st.st_gid).gr_name == group
    mine = project / f"from-{os.getuid()}-{os.getpid()}"
    mine.write_text("shared")
    os.chmod(mine, 0o660)
    try:
        assert grp.getgrgid(mine.stat().st_gid).gr_name == group  # setgid: the group comes from the tree
        res = sh("sudo", "-n", "-u", other, "cat", str(mine))
        assert res.returncode == 0 and res.stdout == "shared", res.stderr
        assert sh("sudo", "-n", "-u", other, "id", "-u").stdout.strip() != str(os.getuid())
    finally:
        mine.unlink()
