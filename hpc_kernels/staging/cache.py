"""The staging cache: where staged inputs live, what they are (bases, wheelhouses, the image's Python), and
the error of a staged build that lacks one."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import Fetch, Staging

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry

EventSink = Callable[[str], None]
CACHE_FORMAT = "hpck-staging-1"


#: How long staging waits for one ``apptainer pull`` / ``pip download`` (large bases, slow mirrors).
PULL_TIMEOUT = 3600.0
PIP_TIMEOUT = 3600.0
PROBE_TIMEOUT = 300.0
#: A build without staging looks up its base's digest this long at most (then builds from the tag).
PIN_TIMEOUT = 10.0
#: Bootstrap agents that download during the build and cannot be staged.
UNSTAGEABLE = {
    "debootstrap": "downloads Debian packages", "yum": "downloads RPM packages", "zypper": "downloads RPM packages",
    "busybox": "downloads busybox", "arch": "downloads Arch packages", "shub": "pulls from Singularity Hub",
    "docker-daemon": "reads the Docker daemon of the node that builds",
}
#: Bootstrap agents whose ``From:`` is a path on this filesystem (made absolute in the derived recipe).
LOCAL_AGENTS = ("localimage", "docker-archive", "oci-archive", "oci")
#: Commands in %post that need the network and that staging cannot serve (reported before a staged build).
NETWORK_COMMANDS = re.compile(r"^(apt-get|apt|yum|dnf|microdnf|apk|zypper|curl|wget|git|conda|mamba|micromamba|"
                              r"npm|cargo|go|Rscript|R)$")




class StagingError(HpcKernelsError):
    """Staging failed, or a staged build lacks an input; ``str(err)`` is one sentence with the fix."""


def default_fetch(entry: KernelEntry) -> Fetch:
    """How a local build of ``entry`` takes its inputs when no flag says (``staging: always`` stages)."""
    return Fetch.STAGE if entry.staging is Staging.ALWAYS else Fetch.NETWORK


def cache_root() -> Path:
    """The staging cache: ``<cache dir>/staging``."""
    return paths.cache_dir() / "staging"


def _dir(name: str) -> Path:
    return paths.private(cache_root() / name)




# ----------------------------------------------------------------------------- staged inputs


@dataclass(frozen=True)
class Probe:
    """What Python a base image has, asked of the image itself."""

    version: str  # 3.11.2
    implementation: str  # cpython
    machine: str  # x86_64
    libc: str  # glibc | musl | ""
    libc_version: str  # 2.36
    ipykernel: bool
    pip: bool
    executable: str

    @property
    def python(self) -> str:
        """``3.11``."""
        return ".".join(self.version.split(".")[:2])

    def platforms(self) -> list[str]:
        """The wheel platform tags this image accepts, best first (pip takes several ``--platform``)."""
        arch = self.machine
        if self.libc == "glibc" and re.match(r"^2\.\d+$", self.libc_version):
            minor = int(self.libc_version.split(".")[1])
            tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)]
            if arch in ("x86_64", "i686", "aarch64", "ppc64le", "s390x"):
                tags.append(f"manylinux2014_{arch}")  # pip adds manylinux2010 and manylinux1 itself
            return tags
        if self.libc == "musl":
            return [f"musllinux_1_{n}_{arch}" for n in (2, 1)]
        return [f"linux_{arch}"]

    def to_json(self) -> dict[str, Any]:
        """For the cache."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Base:
    """A base as a build uses it."""

    stage: int
    shown: str  # docker://docker.io/library/python:3.12-slim, a path
    digest: str  # sha256:... ("" when unknown)
    sif: Path | None  # the staged SIF (registry bases), or the local image


@dataclass(frozen=True)
class Wheel:
    """One staged wheel."""

    file: str
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Wheelhouse:
    """Wheels pip downloaded for one set of requirements, Python and platform."""

    path: Path
    key: str
    wheels: tuple[Wheel, ...]


@dataclass(frozen=True)
class Staged:
    """Everything a staged build of a kernel takes from the cache."""

    bases: tuple[Base, ...]  # the registry bases, staged as SIFs
    final: Base | None  # the base of the image (its last stage), for labels
    probe: Probe | None
    wheelhouse: Wheelhouse | None
    pip_wheel: Path | None
    extras: tuple[str, ...]  # packages added by hpc-kernels (ipykernel)
    seconds: float = 0.0
    fetched: tuple[str, ...] = field(default=(), compare=False)  # what this staging downloaded (empty: all cached)




def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _not_staged(entry: KernelEntry, what: str) -> StagingError:
    return StagingError(
        f"kernel '{entry.name}' builds from staged inputs only (no network here), and {what} is not in the "
        "staging cache: "
        f"stage it on a node with internet (a login node) with 'hpc-kernels build {entry.name} --slurm', which "
        "stages before it submits the job.")


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("FATAL", "ERROR"))]
    line = (fatal or lines or ["no output"])[-1]
    return re.sub(r"^(FATAL|ERROR):\s*", "", line)[:300]
