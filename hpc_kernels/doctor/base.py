"""What every doctor check returns and reads: :class:`Finding`, the statuses, the check ids, and the
:class:`Context` of the node (so a test can present another one)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_kernels import access, paths

OK, WARN, FAIL = "ok", "warn", "fail"

#: Oldest Apptainer we support: unprivileged ``--fakeroot`` builds (no setuid helper) arrived in 1.1.
MIN_APPTAINER = (1, 1)
#: Oldest Singularity (the pre-Apptainer name; SingularityCE keeps it) with the ``exec`` flags we use.
MIN_SINGULARITY = (3, 7)

#: Host variables that break programs when they leak from a module environment into a kernel.
LEAKY_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "LD_LIBRARY_PATH", "LD_PRELOAD")

#: Login nodes, by name: generic ``login1``/``gra-login2``/``login-3`` and DRAC's ``narval1``-style
#: names (login nodes of the national clusters are the cluster name plus a digit). A heuristic:
#: compute nodes there are named differently (``nc10101``, ``fc30105``...).
LOGIN_RE = re.compile(
    r"^(login[-_]?\d*|[a-z0-9]+-login[-_]?\d*|"
    r"(narval|beluga|cedar|graham|fir|rorqual|nibi|trillium|niagara|killarney|vulcan|tamia)\d+)$",
    re.IGNORECASE,
)

PROBE_TIMEOUT = 60.0

#: Every check's id, in the order a report lists them (docs/troubleshooting.md explains each).
CHECKS = ("registry", "runtime", "runtime-version", "build-namespaces", "login-node", "environment",
          "state-dirs", "group", "image", "binds", "ipykernel", "gpu", "slurm-job", "kernel-env", "kernelspec",
          "launcher")


@dataclass(frozen=True)
class Finding:
    """What one check saw: ``status`` is ok, warn or fail; ``fix`` says what to do about it."""

    check: str
    status: str
    message: str
    fix: str = ""
    kernel: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Context:
    """What the checks read from the node (the real one by default; tests may point elsewhere)."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    hostname: str = field(default_factory=paths.hostname)
    uid: int = field(default_factory=os.getuid)
    user: str = field(default_factory=lambda: access.user_name(os.getuid()))
    home: Path = field(default_factory=Path.home)
    proc_root: Path = Path("/proc")
    etc_root: Path = Path("/etc")
    exists: Callable[[str], bool] = os.path.exists
    probe_timeout: float = PROBE_TIMEOUT


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
