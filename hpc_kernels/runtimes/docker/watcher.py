"""The container watcher: once the client a launcher became is gone (or the Jupyter process the kernel lives
for), remove the kernel's container, or kill its process in the shared container and idle-stop it.

``python -I -S -m hpc_kernels.runtimes.docker.watcher kernel|shared ...`` (started by :mod:`.container`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hpc_kernels import procfs
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError
from hpc_kernels.locks import locked
from hpc_kernels.proc import run
from hpc_kernels.runtimes.docker.cli import (
    SHARED_CONN_DIR,
    ContainerCLI,
)
from hpc_kernels.runtimes.docker.container import LOCK_TIMEOUT, stop_if_idle
from hpc_kernels.runtimes.parent import end_client, parse_parent, wait_for_parent

#: After the client dies, a container whose create request was still in flight can appear a moment later.
SETTLE_SECONDS = 1.5


def watch_kernel(cli: ContainerCLI, pid: int, name: str, parent: procfs.ProcRef | None = None) -> None:
    """Per-kernel container: once the client is gone, make sure the container is too; once the Jupyter
    process that started the kernel is gone, remove the container (which ends the client)."""
    orphaned = wait_for_parent(pid, parent)
    cli.remove(name)
    if orphaned:
        print(f"hpc-kernels container watcher: container {name}: the process that started it is gone; "
              "removed it", file=sys.stderr, flush=True)
        end_client(pid)
    time.sleep(SETTLE_SECONDS)
    if cli.inspect([name]):
        cli.remove(name)


def watch_shared(cli: ContainerCLI, pid: int, name: str, kid: str, sdir: Path, idle_timeout: float,
                 parent: procfs.ProcRef | None = None) -> None:
    """Shared container: once the client is gone, or the Jupyter process that started the kernel, kill
    the kernel (exec does not), then idle-stop."""
    orphaned = wait_for_parent(pid, parent)
    marker = f"{SHARED_CONN_DIR}/{kid}.json"
    kill_kernel_processes(cli, name, marker)
    if orphaned:
        print(f"hpc-kernels container watcher: kernel {kid} in {name}: the process that started it is gone; "
              "ended it", file=sys.stderr, flush=True)
        end_client(pid)
    with locked(sdir / "lock", timeout=LOCK_TIMEOUT, private=True):
        for path in (sdir / "kernels" / kid, sdir / "conn" / f"{kid}.json"):
            with contextlib.suppress(OSError):
                path.unlink()
        (sdir / "last_active").touch(mode=0o600)
    # A client killed right after sending its exec request: the kernel may start a moment later.
    time.sleep(min(SETTLE_SECONDS, idle_timeout))
    kill_kernel_processes(cli, name, marker)
    time.sleep(max(0.0, idle_timeout - SETTLE_SECONDS))
    stop_if_idle(cli, name, sdir, idle_timeout)


def kill_kernel_processes(cli: ContainerCLI, name: str, marker: str) -> list[int]:
    """SIGKILL the processes (seen from the host) whose argv contains ``marker``; returns their pids."""
    killed = []
    for pid in pids_with_argument(marker):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
        except PermissionError:
            # A rootful daemon's container runs as root: kill from inside, by its pid there.
            inner = namespaced_pid(pid)
            if inner:
                with contextlib.suppress(ToolError, RuntimeNotFoundError):
                    run([cli.binary, "exec", name, "kill", "-KILL", inner], check=False, timeout=30)
                    killed.append(pid)
    return killed


def pids_with_argument(marker: str) -> list[int]:
    """Host pids whose argv has ``marker`` as one of its arguments (not this process)."""
    want = marker.encode()
    return [pid for pid, args in procfs.processes("cmdline") if want in args]


def namespaced_pid(pid: int) -> str:
    """The pid of a host process inside its innermost pid namespace ("" if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return line.split()[-1]
    except OSError:
        pass
    return ""


# ----------------------------------------------------------------------------- watcher entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpc_kernels.runtimes.docker.watcher kernel|shared RUNTIME BINARY PID NAME [KID DIR IDLE] PARENT``
    (PARENT: ``PID:START`` of the launcher's parent, ``0:0`` for none)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        role, runtime, binary, pid, name = args[:5]
        cli = ContainerCLI(runtime, binary)
        if role == "kernel" and len(args) == 6:
            watch_kernel(cli, int(pid), name, parse_parent(args[5]))
        elif role == "shared" and len(args) == 9:
            watch_shared(cli, int(pid), name, args[5], Path(args[6]), float(args[7]), parse_parent(args[8]))
        else:
            raise ValueError(f"bad arguments {args!r}")
    except (ValueError, HpcKernelsError) as exc:
        print(f"hpc-kernels container watcher: {exc}", file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    # The kernel's signals are not ours: a Ctrl-C in Jupyter's terminal must not stop the cleanup.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(main())
