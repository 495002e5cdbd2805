"""The leak campaign in CI: for every mode, one cycle of each way a kernel can end, as the unprivileged user.

``python -m benchmarks.leak_campaign`` runs the long version (100 cycles per mode) and prints the counts;
here one cycle per end is enough to catch a leak that happens on every kill of that kind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks import leak_campaign

# The campaign checks leftovers itself after every cycle (and removes them, to count the next cycle
# cleanly): the automatic per-test check would only repeat it.
pytestmark = pytest.mark.leaks_ok


def _needs(mode: str, base_sif: Path | None) -> None:
    if mode in ("podman", "docker") and not shutil.which(mode):
        pytest.skip(f"{mode} is not installed (bash .ci/run installs it)")
    if mode == "docker" and not os.path.exists("/run/docker.sock"):
        pytest.skip("no Docker Engine (bash .ci/docker-setup.sh starts dockerd)")


@pytest.mark.parametrize("mode", [
    pytest.param("exec", marks=pytest.mark.apptainer),
    pytest.param("instance", marks=pytest.mark.apptainer),
    pytest.param("podman", marks=pytest.mark.podman),
    pytest.param("docker", marks=pytest.mark.docker),
])
@pytest.mark.timeout(600)
def test_every_end_of_every_mode_leaves_nothing(mode: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    base_sif = request.getfixturevalue("base_sif") if mode in ("exec", "instance") else None
    _needs(mode, base_sif)
    sif = str(base_sif or leak_campaign.DEFAULT_SIF)
    results = leak_campaign.campaign([mode], 1, tmp_path, sif, log=print)
    bad = {f"{m}/{e}": r for (m, e), rs in results.items() for r in rs if r}
    assert set(results) == {(mode, end) for end in leak_campaign.ENDS}
    assert bad == {}, f"left behind or failed: {bad}"
