"""Shared fixtures: an isolated home for every test, and the real components (skip when absent).

In CI (``CI=true``) a skipped real-component test is a failure: a green run must have driven
the real programs.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REAL_MARKERS = ("apptainer", "podman", "docker", "lmod", "slurm", "browser")
CACHE = Path(os.environ.get("HPCK_CI_CACHE", "/var/cache/hpc-kernels-ci"))
#: The user's real home, read before any test moves $HOME (Apptainer may keep instance state there).
REAL_HOME = os.path.expanduser("~")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $HOME, XDG and Jupyter dirs at a temporary directory: tests never touch the real ones."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share"),
                     ("XDG_STATE_HOME", ".local/state"), ("XDG_CACHE_HOME", ".cache")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(home / ".local/share/jupyter"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(home / ".jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(home / ".local/share/jupyter/runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(home / ".ipython"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # Nothing beyond loopback: no best-effort digest lookup of a registry base (in this process or a child).
    monkeypatch.setenv("HPC_KERNELS_NO_LOOKUP", "1")
    for var in ("JUPYTER_PATH", "HPC_KERNELS_REGISTRY", "HPC_KERNELS_DATA", "HPC_KERNELS_STATE",
                "HPC_KERNELS_IMAGES", "APPTAINER_BIND", "SLURM_TMPDIR", "HPC_KERNELS_APPTAINER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(home)
    return home


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry requests from this process go to loopback only (the test bed's own registry); any other
    host fails at once as unreachable, before a DNS lookup: tests never send traffic off this machine."""
    import ipaddress
    import urllib.parse

    from hpc_kernels import oci

    real = oci._request

    def guarded(method: str, url: str, headers: dict[str, str], ref: Any, timeout: float) -> Any:
        host = urllib.parse.urlsplit(url).hostname or ""
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise oci.RegistryError("unreachable", f"cannot reach the registry {host} (tests stay on loopback).")
        return real(method, url, headers, ref, timeout)

    monkeypatch.setattr(oci, "_request", guarded)


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest, isolated_home: Path) -> Iterator[None]:
    """A real-component test leaves nothing: no process, starter, squashfuse, FUSE mount, instance,
    container, Slurm job or build temporary that was not there before it (tests/leaks.py tracks them).

    Leftovers are removed (so the next test starts clean) and the test fails. ``@pytest.mark.leaks_ok``
    opts out: only the tests that leak on purpose to prove these checks fail (tests/test_leak_checks.py).
    """
    node = request.node
    if not any(node.get_closest_marker(m) for m in REAL_MARKERS) or node.get_closest_marker("leaks_ok"):
        yield
        return
    from tests import leaks

    homes = [str(isolated_home), REAL_HOME]
    before = leaks.snapshot(homes)
    yield
    left = leaks.leftovers(before, homes)
    if left:
        leaks.remove(left, homes)
        pytest.fail("left behind:\n  " + "\n  ".join(map(str, sorted(left))), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With CI=true, a skipped real-component test is reported as a failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and any(item.get_closest_marker(m) for m in REAL_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"real-component test skipped in CI (CI=true): {reason}"


# ----------------------------------------------------------------------------- lmod


@pytest.fixture(scope="session")
def lmod_tool() -> Any:
    """The real Lmod (skip where it is absent)."""
    from hpc_kernels.adapters import lmod
    from hpc_kernels.errors import RuntimeNotFoundError

    try:
        return lmod.find()
    except RuntimeNotFoundError as exc:
        pytest.skip(f"Lmod is not installed (bash .ci/lmod-slurm-setup.sh installs it): {exc}")


# ----------------------------------------------------------------------------- apptainer


@pytest.fixture(scope="session")
def apptainer_bin() -> str:
    """The real apptainer binary (skip where it is absent)."""
    found = shutil.which("apptainer") or shutil.which("singularity")
    if not found:
        pytest.skip("Apptainer is not installed (bash .ci/run installs it)")
    return found


@pytest.fixture(scope="session")
def base_sif(apptainer_bin: str) -> Path:
    """The cached Debian test image with python3 + ipykernel (built by .ci/build-test-image.sh)."""
    path = Path(os.environ.get("HPCK_TEST_BASE_SIF", CACHE / "base.sif"))
    if not path.is_file():
        pytest.skip(f"test image {path} missing (run: bash .ci/build-test-image.sh)")
    return path


@pytest.fixture
def make_registry(tmp_path: Path) -> object:
    """Write a kernels.yaml (and recipes) under tmp_path; returns its path."""

    def make(text: str, files: dict[str, str] | None = None) -> Path:
        root = tmp_path / "proj"
        root.mkdir(exist_ok=True)
        for name, body in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(textwrap.dedent(body))
        path = root / "kernels.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return make


def _listening(ip: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((ip, port)) == 0


def start_ready_kernel(make_manager: Any, timeout: float = 90, attempts: int = 3) -> tuple[Any, Any]:
    """Start a kernel and return (manager, ready client), robust to the port race of jupyter_client.

    jupyter_client picks free ports and the kernel binds them later; another process can take one in
    between, the kernel then dies at start-up, and a client sending to it blocks forever (a zmq DEALER
    without a peer). So: wait until the kernel listens on all its ports *while alive*, and start a fresh
    manager (new ports) when it died.
    """
    import time

    failures: list[str] = []
    for _ in range(attempts):
        km = make_manager()
        km.start_kernel()
        ports = (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and km.is_alive():
            if all(_listening(km.ip, port) for port in ports):
                kc = km.client()
                kc.start_channels()
                kc.wait_for_ready(timeout=timeout)
                return km, kc
            time.sleep(0.1)
        alive = km.is_alive()
        failures.append("did not listen in time" if alive else "died during start-up")
        km.shutdown_kernel(now=True) if alive else km.cleanup_resources()
    raise RuntimeError(f"kernel failed to start {attempts} times: {', '.join(failures)}")


def run_cell(kc: Any, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Execute ``code``; the reply's content and everything the cell printed."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)
