"""Shared Apptainer instances (``mode: instance``): their names and identity.

Lifecycle, all of it per host (``paths.host_state_dir()/instances/NAME/``):

* The instance **name** encodes user, kernel, node and Slurm job, plus a digest of the image's
  identity (path, inode, size, mtime: a rebuilt image gets a new name) and of everything fixed at
  ``instance start`` (binds, connection directory, GPU flag, runtime args).
* **attach** (:mod:`.attach`): under the instance's ``flock``, start the instance if its record is missing or
  its process is gone (8 racing launches start exactly one), make sure its reaper runs, write an
  *attachment* record for this launcher (pid + start time, so pid reuse is harmless), release the
  lock and ``execve`` ``apptainer exec instance://NAME``. The launcher process *becomes* the
  kernel's runtime process, so jupyter_client's kill and liveness checks reach it directly.
* The **reaper** (:mod:`.reaper`) is a small detached process (own session, so SIGKILL of a launcher's
  process group cannot reach it) started with the instance. It prunes attachments whose process is gone,
  kills processes left in the container by those kernels (found by a variable we set in the
  container environment), and stops the instance once no kernel has been attached for
  ``idle_timeout`` seconds. It only ever looks at this host's state, so it never stops an instance
  of another node.
* Records (:mod:`.records`), ``hpc-kernels instances``/``stop`` (:mod:`.status`), gc (:mod:`.sweep`).

Import-light: the launcher imports this on every instance-mode kernel start.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.model import LaunchSpec

NAME_PREFIX = "hpck-"
#: Apptainer's own rule for instance names, and a length its log file names stay within.
NAME_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
NAME_MAX = 100
#: The name ends in OWNER (4 hex digits: which state tree started it, so that gc never stops an
#: instance another state tree tracks) followed by DIGEST (the instance's identity).
OWNER_LEN = 4
DIGEST_LEN = 8
#: Variables set inside the container of every attached kernel (inherited by its children).
ENV_INSTANCE = "HPC_KERNELS_INSTANCE"
ENV_ATTACHMENT = "HPC_KERNELS_ATTACHMENT"
RECORD = "instance.json"
KERNELS = "kernels"
IDLE = "idle-since"
START_TIMEOUT = 120.0
#: Seconds a kernel whose Jupyter process died gets to exit on SIGTERM before SIGKILL.
ORPHAN_GRACE = 3.0
STOP_TIMEOUT = 60.0
#: The longest a process of ours holds an instance's lock: a start that must replace a leftover
#: instance (start, stop, start again), plus a margin. A longer wait means a stuck process.
LOCK_TIMEOUT = 2 * START_TIMEOUT + STOP_TIMEOUT + 30.0


# ----------------------------------------------------------------------------- identity and names


@dataclass(frozen=True)
class Identity:
    """What makes two launches share an instance."""

    user: str
    kernel: str
    host: str
    job: str
    owner: str
    digest: str

    @property
    def name(self) -> str:
        """``hpck-KERNEL-USER-HOST[-jJOB]-OWNERDIGEST``, within Apptainer's character set and length."""
        tail = "-".join(_clean(p) for p in (self.user, self.host) if p)
        if self.job:
            tail += f"-j{_clean(self.job)}"
        tail += f"-{self.owner}{self.digest}"
        room = NAME_MAX - len(NAME_PREFIX) - len(tail) - 1
        kernel = re.sub(r"[^a-zA-Z0-9._-]+", "_", self.kernel) or "_"
        return f"{NAME_PREFIX}{kernel[: max(room, 1)]}-{tail}"[:NAME_MAX]


def _clean(part: str) -> str:
    # No '-' inside user, host and job: it separates the fields of the name.
    return re.sub(r"[^a-zA-Z0-9._]+", "_", part) or "_"


def user_name() -> str:
    """The login name of this uid (not ``$USER``, which a module environment may have changed)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def image_id(image: str) -> str:
    """Identity of the image file: builds replace it atomically, so a rebuild changes inode and mtime."""
    real = os.path.realpath(image)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise HpcKernelsError(f"cannot read the image {image}: {exc.strerror}.") from None
    return f"{real}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def identity(spec: LaunchSpec, start_argv: list[str], environ: Mapping[str, str]) -> Identity:
    """The identity of the instance ``spec`` needs: image identity plus the whole start command."""
    h = hashlib.sha256()
    h.update(image_id(spec.image).encode())
    # argv minus the pid file (per instance, not part of what the instance *is*) and the name.
    h.update(json.dumps(_without_pid_file(start_argv)[:-1]).encode())
    return Identity(
        user=user_name(), kernel=spec.kernel, host=paths.hostname(),
        job=environ.get("SLURM_JOB_ID", ""), owner=owner_tag(), digest=h.hexdigest()[:DIGEST_LEN],
    )


def owner_tag() -> str:
    """Short digest of this host's state directory: marks the instances it tracks."""
    return hashlib.sha256(str(root()).encode()).hexdigest()[:OWNER_LEN]


def _without_pid_file(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--pid-file":
            skip = True
        else:
            out.append(arg)
    return out


def connection_dir(connection_file: str) -> str:
    """The directory to bind for ``connection_file`` (Apptainer's bind syntax forbids ':' and ',')."""
    directory = os.path.dirname(os.path.abspath(connection_file))
    if ":" in directory or "," in directory:
        raise HpcKernelsError(
            f"the connection file's directory {directory} contains ':' or ',', which Apptainer binds "
            "cannot express; set JUPYTER_RUNTIME_DIR to a simpler path."
        )
    return directory


def root() -> Path:
    """Where this host's instance state lives."""
    return paths.host_state_dir() / "instances"


def instance_dir(name: str) -> Path:
    """State directory of instance ``name`` (its lock files stay there for its whole life)."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise HpcKernelsError(f"'{name}' is not a valid instance name.")
    return root() / name
