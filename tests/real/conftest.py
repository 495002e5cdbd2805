"""Fixtures of the real-component tests: the real tools and test image (skip where absent) and the
leftover check every real-component test runs under."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels.errors import RuntimeNotFoundError
from tests.helpers import leaks, lmod
from tests.helpers.testbed import CACHE, REAL_MARKERS

#: The user's real home, read before any test moves $HOME (Apptainer may keep instance state there).
REAL_HOME = os.path.expanduser("~")


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest, isolated_home: Path) -> Iterator[None]:
    """A real-component test leaves nothing: no process, starter, squashfuse, FUSE mount, instance,
    container, Slurm job or build temporary that was not there before it (tests/helpers/leaks.py tracks them).

    Leftovers are removed (so the next test starts clean) and the test fails. ``@pytest.mark.leaks_ok``
    opts out: only the tests that leak on purpose to prove these checks fail (tests/real/test_leak_checks.py).
    """
    node = request.node
    if not any(node.get_closest_marker(m) for m in REAL_MARKERS) or node.get_closest_marker("leaks_ok"):
        yield
        return
    homes = [str(isolated_home), REAL_HOME]
    before = leaks.snapshot(homes)
    yield
    left = leaks.leftovers(before, homes)
    if left:
        leaks.remove(left, homes)
        pytest.fail("left behind:\n  " + "\n  ".join(map(str, sorted(left))), pytrace=False)


# ----------------------------------------------------------------------------- lmod


@pytest.fixture(scope="session")
def lmod_tool() -> Any:
    """The real Lmod (skip where it is absent)."""
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

