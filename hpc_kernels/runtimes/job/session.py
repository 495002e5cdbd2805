"""A job kernel's session (``<state>/kernel-jobs/<sid>.json``, private): its id, derived from the kernel
name and the connection key (which jupyter_client keeps across restarts), the job's name, the connection
file as the launcher reads it, and whether the launcher recorded in it still runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.procfs import alive, start_of
from hpc_kernels.runtimes.job.control import read_json
from hpc_kernels.runtimes.job.wire import CHANNELS

#: After its launcher died, the watcher waits this long for a successor (a restart) before cancelling.
GRACE = 30.0
#: Names of our kernel jobs: ``hpck-kernel-<kernel>-<sid[:8]>``.
JOB_PREFIX = "hpck-kernel-"
#: How often the launcher asks Slurm about a job it waits for.
POLL_INTERVAL = 3.0
#: The time-limit warning: sbatch --signal=B:USR1@60 (the agent passes it on).
WARN_BEFORE = 60
SESSION_FORMAT = 1
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def say(kernel: str, text: str) -> None:
    """A line for the Jupyter server's log (the launcher's stderr)."""
    print(f"hpc-kernels: kernel '{kernel}': {text}", file=sys.stderr, flush=True)


def sessions_dir() -> Path:
    """Private records of job kernels: ``<state dir>/kernel-jobs``."""
    return paths.state_dir() / "kernel-jobs"


def session_id(kernel: str, key: str) -> str:
    """One kernel session (the same across restarts: jupyter_client keeps the key) as 16 hex digits."""
    return hashlib.sha256(f"hpc-kernels job kernel\0{kernel}\0{key}".encode()).hexdigest()[:16]


def job_name(kernel: str, sid: str) -> str:
    """The Slurm job name of a session: ``squeue`` shows the kernel, ``gc`` finds the session."""
    return f"{JOB_PREFIX}{kernel}-{sid[:8]}"


@dataclass(frozen=True)
class Connection:
    """What we use of jupyter_client's connection file."""

    ip: str
    ports: dict[str, int]
    key: str
    signature_scheme: str
    #: Everything else of the file (kernel_name, jupyter_session, CurveZMQ keys…): the node's copy gets it too.
    extra: dict[str, Any]


def read_connection(path: str) -> Connection:
    """The client's connection file; an HpcKernelsError says what a job kernel cannot work with."""
    data = read_json(path)
    if data is None:
        raise HpcKernelsError(f"cannot read the connection file {path}.")
    if data.get("transport", "tcp") != "tcp":
        raise HpcKernelsError("a job kernel needs the tcp transport (the connection file asks for "
                              f"{data.get('transport')!r}).")
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise HpcKernelsError("a job kernel needs a signed connection (the connection file has no key): the "
                              "key proves to the job's agent that this launcher may use it.")
    ports = {}
    for name in CHANNELS:
        port = data.get(f"{name}_port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise HpcKernelsError(f"the connection file {path} has no valid {name}_port.")
        ports[name] = port
    own = {"ip", "key", "transport", "signature_scheme", *(f"{name}_port" for name in CHANNELS)}
    return Connection(str(data.get("ip") or "127.0.0.1"), ports, key,
                      str(data.get("signature_scheme") or "hmac-sha256"),
                      {k: v for k, v in data.items() if k not in own})


# ----------------------------------------------------------------------------- sessions


def session_path(sid: str) -> Path:
    """The session record (the agent's file and the node's connection file sit beside it)."""
    return sessions_dir() / f"{sid}.json"


def load_sessions() -> list[dict[str, Any]]:
    """Every session record of ours (files we did not write are ignored)."""
    found = []
    directory = sessions_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if path.name.count(".") != 1:  # <sid>.agent.json, <sid>.node.json
            continue
        data = read_json(str(path))
        if data and data.get("generator") == "hpc-kernels" and data.get("sid") == path.stem:
            found.append(data)
    return found


def remove_session(sid: str) -> None:
    """Forget a session: its record, the agent's file and the node's connection file."""
    for suffix in (".json", ".agent.json", ".node.json"):
        with contextlib.suppress(OSError):
            (sessions_dir() / f"{sid}{suffix}").unlink()


def launcher_alive(session: dict[str, Any], pid_key: str = "launcher_pid") -> bool:
    """Whether the process recorded under ``pid_key`` still runs on this host (same pid, same start)."""
    if session.get("host") != paths.hostname():
        return True  # another login node's: not ours to judge
    try:
        pid = int(session.get(pid_key) or 0)
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not alive(pid):
        return False
    recorded = str(session.get(pid_key.replace("_pid", "_start")) or "")
    return not recorded or recorded == start_of(pid)


def _logs_dir() -> Path:
    return paths.log_dir() / "slurm"


def _start_of(pid: int) -> str:
    return start_of(pid)
