"""End to end with the real programs: spython → apptainer build → kernelspec → jupyter_client kernel."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels.runtimes.apptainer.cli import CONNECTION_DST
from tests.helpers.kernels import run_cell, start_ready_kernel

pytestmark = pytest.mark.apptainer

DEF = """\
Bootstrap: localimage
From: {base}

%files
    hello.txt /opt/hello.txt

%post
    echo built-by-hpc-kernels > /etc/hpck-built
"""

PROBE = (
    "import os, sys; print(open('/etc/hpck-built').read().strip(), open('/opt/hello.txt').read().strip(), "
    "os.environ.get('SLURM_JOB_ID'), os.environ.get('PYTHONPATH'), os.environ.get('PYTHONNOUSERSITE'), "
    "os.path.exists('/etc/hpck-test-image'))"
)


@pytest.fixture
def only_apptainer(tmp_path: Path, apptainer_bin: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with `apptainer` (a wrapper that logs each run) and no `singularity`: spython must cope."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "apptainer-calls.log"
    wrapper = bindir / "apptainer"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {os.path.realpath(apptainer_bin)} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/local/bin:/usr/bin:/bin")
    return log


def hk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(make_registry: Any, base_sif: Path) -> Path:
    return make_registry(  # type: ignore[no-any-return]
        """\
        defaults:
          images_dir: images
          command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
        kernels:
          sci:
            def: sci.def
            display_name: Science (test)
            pass_env: [PASS_ME]
          broken:
            def: broken.def
        """,
        {"sci.def": DEF.format(base=base_sif), "hello.txt": "hello from the host",
         "broken.def": f"Bootstrap: localimage\nFrom: {base_sif}\n\n%post\n    echo about to fail\n    exit 3\n"},
    )


@pytest.fixture
def kernel_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from jupyter_client import KernelManager

    managers: list[Any] = []

    def make(name: str) -> Any:
        km = KernelManager(kernel_name=name)
        managers.append(km)
        return km

    yield make
    for km in managers:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def test_build_install_and_run_a_real_kernel(project: Path, only_apptainer: Path, kernel_manager: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    image = project.parent / "images" / "sci.sif"
    done = hk("build", "sci", "--registry", str(project))
    assert done.returncode == 0, done.stderr
    assert image.is_file() and "built" in done.stderr and "log:" in done.stderr
    calls = only_apptainer.read_text().splitlines()
    # spython ran `singularity` → our shim → the build guard → apptainer; then the new image was checked
    # (exec) and its labels read back for its record (inspect).
    assert [c.split()[0] for c in calls] == ["--version", "build", "-q", "inspect"] and " exec " in calls[2]
    assert "import ipykernel" in calls[2]

    # A no-op build runs no apptainer process at all.
    before = only_apptainer.read_text()
    done = hk("build", "sci", "--registry", str(project))
    assert done.returncode == 0 and "up to date" in done.stderr
    assert only_apptainer.read_text() == before

    # A failing recipe: exit 1, the log tail in the message, no temporaries.
    done = hk("build", "broken", "--registry", str(project))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "building kernel 'broken' failed" in done.stderr and "about to fail" in done.stderr
    assert "full build log:" in done.stderr

    # The SAME kernel's recipe now fails: its good image stays byte for byte what it was.
    recipe = project.parent / "sci.def"
    good_recipe = recipe.read_text()
    good_bytes = hashlib.sha256(image.read_bytes()).hexdigest()
    recipe.write_text(good_recipe.replace("%post\n", "%post\n    echo about to fail\n    exit 3\n"))
    done = hk("build", "sci", "--registry", str(project))
    assert done.returncode == 1 and "building kernel 'sci' failed" in done.stderr, done.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == good_bytes
    assert not list(image.parent.glob(".*.tmp-*"))
    recipe.write_text(good_recipe)
    assert "up to date" in hk("build", "sci", "--registry", str(project)).stderr  # the same inputs again

    assert hk("install", "sci", "--registry", str(project)).returncode == 0
    shown = hk("show", "sci", "--registry", str(project)).stdout
    assert "exec --cleanenv" in shown and f":{CONNECTION_DST}:rw" in shown and str(image) in shown

    # The kernel runs in the container, with a clean environment plus the allowlist.
    monkeypatch.setenv("PYTHONPATH", "/leaky/host/path")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    km, kc = start_ready_kernel(lambda: kernel_manager("sci"))
    try:
        reply, out = run_cell(kc, PROBE)
        assert reply["status"] == "ok"
        # $HOME (the tests' isolated one) is the kernel's home: ~/.ipython never lands in the real home
        assert run_cell(kc, "import os; print(os.path.expanduser('~'))")[1].strip() == os.environ["HOME"]
        assert out.split() == ["built-by-hpc-kernels", "hello", "from", "the", "host", "4242", "None", "1", "True"]

        # Interrupt during time.sleep, once the kernel is busy in it: KeyboardInterrupt, the kernel lives on.
        msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(30)")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                break
        else:
            raise AssertionError("the cell never started")
        started = time.monotonic()
        km.interrupt_kernel()
        while True:
            msg = kc.get_shell_msg(timeout=20)
            if msg["parent_header"].get("msg_id") == msg_id:
                break
        assert msg["content"]["status"] == "error" and msg["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 15
        time.sleep(1)  # ipykernel 6.17 aborts requests that arrive right after an error
        reply, out = run_cell(kc, "print('still alive', 6 * 7)")
        assert out.strip() == "still alive 42"

        # Restart: state defined before is gone after; a new kernel process in a new container.
        reply, out = run_cell(kc, "import os; state = 'kept'; print(os.getpid(), state)")
        pid_before, kept = out.split()
        assert reply["status"] == "ok" and kept == "kept"
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=90)
        reply, out = run_cell(kc, "import os; print(os.getpid()); print('state' in dir())")
        assert reply["status"] == "ok" and out.split()[1] == "False" and out.split()[0] != pid_before
        pids = [int(pid_before), int(out.split()[0]), km.provisioner.pid]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # Nothing is left: neither kernel process, nor the launcher/apptainer process.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if os.path.exists(f"/proc/{p}")] == []
    # (starters, squashfuse and every other process are checked by the no_leftovers fixture)


def test_kill_of_the_kernel_takes_the_container_down(project: Path, only_apptainer: Path, base_sif: Path,
                                                     make_registry: Any, kernel_manager: Any) -> None:
    reg = make_registry(
        f"kernels:\n  ext:\n    image: {base_sif}\n"
        "    command: [python3, -m, ipykernel_launcher, -f, '{connection_file}']\n"
    )
    assert hk("install", "ext", "--registry", str(reg)).returncode == 0
    km, kc = start_ready_kernel(lambda: kernel_manager("ext"))
    pid = int(run_cell(kc, "import os; print(os.getpid())")[1])
    kc.stop_channels()
    km.shutdown_kernel(now=True)  # SIGKILL of the launcher (= apptainer) process group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")


def test_list_shows_image_states(project: Path, only_apptainer: Path) -> None:
    listing = json.loads(hk("list", "--json", "--registry", str(project)).stdout)
    assert {r["kernel"]: r["image_state"] for r in listing["kernels"]} == {"sci": "missing", "broken": "missing"}


def test_an_image_with_only_python3_starts_without_a_command(base_sif: Path, make_registry: Any,
                                                             only_apptainer: Path, kernel_manager: Any) -> None:
    """The test image, like every Debian/Ubuntu image, has python3 and no python: with no `command:` in the
    registry, install finds python3 in it, and the kernel starts (it used to die: 'python' not found)."""
    reg = make_registry(f"kernels:\n  plain:\n    image: {base_sif}\n")
    done = hk("install", "plain", "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    shown = json.loads(hk("show", "plain", "--json", "--registry", str(reg)).stdout)
    assert shown["kernel_json"]["metadata"]["hpc_kernels"]["command"][0] == "python3"
    km, kc = start_ready_kernel(lambda: kernel_manager("plain"), attempts=1)
    try:
        assert run_cell(kc, "import sys; print(sys.version_info[0])")[1].strip() == "3"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_built_image_that_cannot_start_its_kernel_keeps_the_old_one(make_registry: Any, base_sif: Path,
                                                                      only_apptainer: Path) -> None:
    """No `command:`: the build finds python3 with ipykernel in the new image and records it; a recipe that
    loses ipykernel fails the build, which names the fix and keeps the previous image."""
    good = f"Bootstrap: localimage\nFrom: {base_sif}\n\n%post\n    echo fine\n"
    reg = make_registry("defaults:\n  images_dir: images\nkernels:\n  k:\n    def: k.def\n", {"k.def": good})
    image = reg.parent / "images" / "k.sif"
    done = hk("build", "k", "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    stamp = json.loads((image.parent / "k.sif.hpck.json").read_text())
    assert (stamp["program"], stamp["program_check"]) == ("python3", "import ipykernel")
    before = image.stat().st_mtime_ns

    (reg.parent / "k.def").write_text(good + "    rm -rf /usr/lib/python3/dist-packages/ipykernel\n")
    done = hk("build", "k", "--registry", str(reg))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the new image cannot start the kernel" in done.stderr
    assert "No module named 'ipykernel'" in done.stderr and "python3 -m pip install ipykernel" in done.stderr
    assert image.stat().st_mtime_ns == before
    assert sorted(p.name for p in image.parent.iterdir()) == ["k.sif", "k.sif.hpck.json"]
