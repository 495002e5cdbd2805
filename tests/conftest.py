"""Shared fixtures: an isolated home for every test, loopback-only registry traffic, a registry maker.

In CI (``CI=true``) a skipped real-component test is a failure: a green run must have driven
the real programs. Real-component fixtures (the tools, the test image, the leftover check) are in
tests/real/conftest.py; a test with a real-component marker belongs under tests/real/.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.testbed import REAL_MARKERS, REAL_TREE_MARKERS

REAL_TREE = Path(__file__).resolve().parent / "real"


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With CI=true, a skipped real-component test is reported as a failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and any(item.get_closest_marker(m) for m in REAL_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"real-component test skipped in CI (CI=true): {reason}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A real-component test outside tests/real/ is a misplaced test: it would run without the leftover check."""
    misplaced = sorted({item.nodeid.split("::")[0] for item in items
                        if any(item.get_closest_marker(m) for m in REAL_TREE_MARKERS)
                        and REAL_TREE not in Path(str(item.path)).resolve().parents})
    if misplaced:
        raise pytest.UsageError("real-component tests outside tests/real/ (move them): " + ", ".join(misplaced))
