"""The test bed's vocabulary: the markers of real components and where .ci/ caches its images."""

from __future__ import annotations

import os
from pathlib import Path

#: Markers of tests that drive a real component (skipped where it is absent; a failure with CI=true).
REAL_MARKERS = ("apptainer", "podman", "docker", "lmod", "slurm", "browser")
#: Markers that put a test module under tests/real/ (REAL_MARKERS and ``root``).
REAL_TREE_MARKERS = (*REAL_MARKERS, "root")
#: Where .ci/run keeps slow things (the test image, the rootfs tarball).
CACHE = Path(os.environ.get("HPCK_CI_CACHE", "/var/cache/hpc-kernels-ci"))
