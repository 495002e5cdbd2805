"""What is inside a built image: the ``org.hpc-kernels.*`` labels every build writes into it (recipe and base
digests, the packages installed, the hpc-kernels version, a build id), read back from the image, and the build
record beside it that keeps a copy (``show`` works where Apptainer is not on PATH).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels.build.derive import FREEZE
from hpc_kernels.build.recipegen import Label
from hpc_kernels.build.stamps import read_stamp
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import Runtime
from hpc_kernels.proc import run
from hpc_kernels.runtimes.apptainer.cli import find_binary

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry
    from hpc_kernels.staging.prepare import Prepared

LABEL_PREFIX = "org.hpc-kernels."


def new_build_id(digest: str) -> str:
    """A short id for one build (in the image's labels and its record; ``list --builds`` shows it)."""
    return hashlib.sha256(f"{digest}:{time.time_ns()}:{os.getpid()}".encode()).hexdigest()[:12]


def image_labels(image: Path, timeout: float = 60.0) -> dict[str, str] | None:
    """The labels of a SIF (``apptainer inspect --labels --json``: reads the SIF's metadata, starts nothing);
    None when Apptainer is absent or cannot read it."""

    try:
        done = run([find_binary(), "inspect", "--labels", "--json", str(image)], check=False, timeout=timeout)
    except HpcKernelsError:  # no apptainer on PATH, a time-out
        return None
    try:
        labels = json.loads(done.stdout)["data"]["attributes"]["labels"]
    except (ValueError, KeyError, TypeError):
        return None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None


def record_fields(prepared: Prepared, image: Path) -> dict[str, Any]:
    """The build record's copy of what the new image says about itself (its labels, read back from it)."""
    labels = image_labels(image) or {}
    ours = {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)} or dict(prepared.labels)
    packages = ours.get(Label.PACKAGES.value)
    found = packages.split() if packages else (packages_in(image) if labels else None)
    return {
        "build_id": prepared.labels.get(Label.BUILD_ID.value),
        "labels": ours,
        "packages": found,
        "staged": prepared.staged is not None,
        "derived_recipe": str(prepared.recipe),
    }


def packages_in(image: Path, pythons: tuple[str, ...] = ("python3", "python")) -> list[str] | None:
    """The packages the image's Python sees, asked of the image (``apptainer exec``): for an image whose recipe
    has no %post (no shell to write the label with). None when it has no Python."""

    for python in pythons:
        try:
            done = run([find_binary(), "-q", "exec", "--cleanenv", "--contain", str(image), python, "-c", FREEZE],
                       check=False, timeout=120)
        except HpcKernelsError:
            return None
        line = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
        if line and line[0].startswith(Label.PACKAGES.value + " "):
            return line[0].split()[1:]
    return None


@dataclass(frozen=True)
class ImageInfo:
    """What a kernel's built image says it holds."""

    image: Path
    build_id: str | None
    built_at: float | None
    labels: dict[str, str]  # org.hpc-kernels.* only
    packages: tuple[str, ...] | None
    source: str  # "image labels" | "build record"

    def to_json(self) -> dict[str, Any]:
        """For ``show --json``."""
        return {"image": str(self.image), "build_id": self.build_id, "built_at": self.built_at,
                "labels": self.labels, "packages": list(self.packages) if self.packages is not None else None,
                "source": self.source}


def image_info(entry: KernelEntry, *, read_image: bool = True) -> ImageInfo | None:
    """The labels of ``entry``'s image (from the image itself when Apptainer can read them, else from the build
    record); None when there is no image built by hpc-kernels."""

    if entry.runtime != Runtime.APPTAINER or not entry.image.is_file():
        return None
    stamp = read_stamp(entry.image) or {}
    labels = image_labels(entry.image) if read_image else None
    source = "image labels"
    ours = {k: v for k, v in (labels or {}).items() if k.startswith(LABEL_PREFIX)}
    if not ours:
        recorded = stamp.get("labels")
        ours = {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}
        source = "build record"
    if not ours and not stamp:
        return None
    packages = ours.get(Label.PACKAGES.value)
    recorded = stamp.get("packages")
    if not packages and isinstance(recorded, list):  # asked of the image after its build (no %post)
        packages = " ".join(str(p) for p in recorded)
    built_at = stamp.get("built_at")
    build_id = ours.get(Label.BUILD_ID.value) or (str(stamp["build_id"]) if stamp.get("build_id") else None)
    return ImageInfo(entry.image, build_id, float(built_at) if isinstance(built_at, (int, float)) else None,
                     ours, tuple(packages.split()) if packages is not None else None, source)


def build_id(entry: KernelEntry) -> str | None:
    """The id of the build that made ``entry``'s image, from its record (no process: ``list`` asks for all)."""
    if entry.runtime != Runtime.APPTAINER:
        return None
    stamp = read_stamp(entry.image) or {}
    value = stamp.get("build_id")
    return str(value) if value else None
