"""Docker/Podman kernels: one container per kernel, or one shared container per user and kernel.

Leak-free by construction. Killing a ``docker run``/``docker exec`` client does not stop what it
started (measured: the container keeps running with its ports open), and jupyter_client's hard kill is
SIGKILL to the launcher's whole process group. So before the launcher ``exec``s the client, it starts a
*watcher* (:mod:`.watcher`) in its own session (outside that group): the watcher blocks on the launcher's
pid (a pidfd; exec keeps the pid) and on the Jupyter process the kernel lives for (``$JPY_PARENT_PID``:
the server or client that started it), and, whichever way the client ends or when that process dies
without shutting the kernel down, removes the kernel's container (``rm -f``) or, in a shared container,
kills the kernel's process and stops the container once it has been idle for ``idle_timeout`` seconds.
:mod:`.sweep` is the safety net for ``hpc-kernels gc``.

Shared containers keep their bookkeeping in ``<host state dir>/containers/<name>/``: ``conn/`` (bound
into the container: the kernels' connection files), ``kernels/<id>`` (the pid of each kernel's
watcher: a kernel counts as live while its watcher runs), ``last_active`` (mtime) and ``lock``. It is
removed when the container is stopped; gc removes that of a container that is gone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hpc_kernels import paths, procfs, selfexec
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import open_private, private_dir
from hpc_kernels.locks import locked
from hpc_kernels.model import LaunchSpec, Mode
from hpc_kernels.proc import run
from hpc_kernels.runtimes.base import Plan
from hpc_kernels.runtimes.docker.cli import (
    LABEL_CONNECTION,
    LABEL_HOST,
    LABEL_IDLE,
    LABEL_KERNEL,
    LABEL_OWNER,
    LABEL_PID,
    LABEL_PID_START,
    LABEL_ROLE,
    LOCAL_PREFIX,
    SHARED_CONN_DIR,
    ContainerCLI,
    docker_binds,
    find_binary,
    image_name,
    user_name,
)
from hpc_kernels.runtimes.envpolicy import container_env
from hpc_kernels.runtimes.parent import parent_arg

LABEL_STATE_DIR = "hpc-kernels.state-dir"
LABEL_CONFIG = "hpc-kernels.config"
#: The longest a process of ours holds a shared container's lock (starting it takes up to 300 s),
#: plus a margin: a longer wait means a stuck process (see hpc_kernels.locks.locked).
LOCK_TIMEOUT = 360.0



def arm(spec: LaunchSpec, connection_file: str, environ: Mapping[str, str] | None = None) -> Plan:
    """Get ready to launch ``spec`` and return (argv, env, warnings) for the launcher to ``exec``.

    Starts the watcher (and, in shared mode, the shared container) first, so that no exit path of
    the client it returns can leak a container or a kernel process.
    """
    env = dict(os.environ if environ is None else environ)
    cli = ContainerCLI(spec.runtime, _binary(spec.runtime, env))
    mark_used(cli.name)
    cli.check_host_network()
    image = image_name(spec)
    local = image.startswith(LOCAL_PREFIX)
    image_id = cli.image_id(image) if local or spec.mode == Mode.INSTANCE else None
    if local and image_id is None:
        raise HpcKernelsError(f"the image of kernel '{spec.kernel}' ({image}) does not exist in {cli.name}; "
                              f"build it with 'hpc-kernels build {spec.kernel}'.")
    cenv = container_env(spec, env)
    if spec.mode == Mode.INSTANCE:
        return _prepare_shared(cli, spec, connection_file, env, cenv, image_id)
    return _prepare_own(cli, spec, os.path.abspath(connection_file), env, cenv)


def plan(spec: LaunchSpec, connection_file: str, environ: Mapping[str, str] | None = None) -> Plan:
    """What :func:`arm` would return, without side effects (for ``hpc-kernels show``)."""
    env = dict(os.environ if environ is None else environ)
    cli = ContainerCLI(spec.runtime, _binary(spec.runtime, env))
    cenv = container_env(spec, env)
    if spec.mode == Mode.INSTANCE:
        argv = cli.exec_argv(spec, shared_name(spec.kernel), f"{SHARED_CONN_DIR}/<kernel-id>.json", cenv)
        return argv, {**env, **cenv}, []
    labels = _labels(spec, "kernel")
    labels.update({LABEL_PID: "<launcher pid>", LABEL_CONNECTION: connection_file})
    argv, warnings = cli.run_argv(spec, connection_file, f"hpck-{spec.kernel}-<random>", labels, cenv)
    return argv, {**env, **cenv}, warnings


def _binary(runtime: str, env: Mapping[str, str]) -> str:
    return find_binary(runtime, env)


def _labels(spec: LaunchSpec, role: str) -> dict[str, str]:
    return {LABEL_KERNEL: spec.kernel, LABEL_ROLE: role, LABEL_HOST: paths.hostname(),
            LABEL_OWNER: user_name()}


def _mark(runtime: str) -> Path:
    return paths.host_state_dir() / "containers" / f".used-{runtime}"


def mark_used(runtime: str) -> None:
    """Remember that a kernel of ours started containers with ``runtime`` on this host: ``gc`` asks that
    runtime for leftovers only then (a kernelspec removed since may have left one behind)."""
    marker = _mark(runtime)
    if not marker.exists():
        paths.private(marker.parent)  # per-user state, like the records beside it
        os.close(open_private(marker, os.O_WRONLY | os.O_CREAT))


def runtimes_marked() -> list[str]:
    """The container runtimes :func:`mark_used` recorded on this host."""
    return [r for r in ("docker", "podman") if _mark(r).exists()]


# ----------------------------------------------------------------------------- one container per kernel


def container_name(kernel: str) -> str:
    """A fresh container name for one kernel (unique: a restart never waits for the old name)."""
    return f"hpck-{kernel}-{secrets.token_hex(4)}"


def _prepare_own(cli: ContainerCLI, spec: LaunchSpec, connection_file: str, env: dict[str, str],
                 cenv: dict[str, str]) -> Plan:
    # A container still holding this connection file's ports (a restart after a hard kill whose watcher
    # has not finished yet) would make the new kernel fail to bind: remove it first.
    cli.remove(*cli.ids(f"label={LABEL_CONNECTION}={connection_file}"))
    name = container_name(spec.kernel)
    labels = _labels(spec, "kernel")
    labels.update({LABEL_PID: str(os.getpid()), LABEL_PID_START: procfs.start_of(os.getpid()),
                   LABEL_CONNECTION: connection_file})
    argv, warnings = cli.run_argv(spec, connection_file, name, labels, cenv)
    client_env = {**env, **cenv}
    # The watcher is a host Python: it gets the host environment, not the kernel's (PYTHONPATH...).
    spawn_watcher(["kernel", cli.name, cli.binary, str(os.getpid()), name, parent_arg()], env)
    return argv, client_env, warnings


# ----------------------------------------------------------------------------- shared containers


def shared_name(kernel: str, user: str | None = None) -> str:
    """The one shared container of ``user`` for ``kernel``."""
    return f"hpck-{user or user_name()}-{kernel}"


def shared_dir(name: str) -> Path:
    """Bookkeeping of a shared container (per host: the container lives on this host)."""
    return paths.host_state_dir() / "containers" / name


def _prepare_shared(cli: ContainerCLI, spec: LaunchSpec, connection_file: str, env: dict[str, str],
                    cenv: dict[str, str], image_id: str | None) -> Plan:
    name = shared_name(spec.kernel)
    sdir = shared_dir(name)
    paths.private(sdir)  # per-user state: 0700 from the state directory down (older versions: 0755)
    kid = secrets.token_hex(8)
    warnings: list[str] = []
    client_env = {**env, **cenv}
    with locked(sdir / "lock", timeout=LOCK_TIMEOUT, private=True):
        warnings += _ensure_shared(cli, spec, name, sdir, image_id)
        # exec cannot bind a file into a running container: the kernel reads a private copy in the
        # bound directory (ipykernel rewrites it; the ports are the ones jupyter_client chose).
        conn = sdir / "conn" / f"{kid}.json"
        data = Path(connection_file).read_bytes()
        fd = os.open(conn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        watcher = spawn_watcher(
            ["shared", cli.name, cli.binary, str(os.getpid()), name, kid, str(sdir), str(spec.idle_timeout),
             parent_arg()],
            env,
        )
        private_dir(sdir / "kernels")
        (sdir / "kernels" / kid).touch(mode=0o600)
        (sdir / "kernels" / kid).write_text(f"{watcher}\n", encoding="utf-8")
        (sdir / "last_active").touch(mode=0o600)
    argv = cli.exec_argv(spec, name, f"{SHARED_CONN_DIR}/{kid}.json", cenv)
    return argv, client_env, warnings


def _ensure_shared(cli: ContainerCLI, spec: LaunchSpec, name: str, sdir: Path,
                   image_id: str | None) -> list[str]:
    """Start the shared container unless it runs the current image (call with its lock held)."""
    private_dir(sdir / "conn")
    found = cli.inspect([name])
    config = shared_config(spec)
    if found and found[0].running:
        same_image = not image_id or _same_image(image_id, found[0].image)
        if same_image and found[0].labels.get(LABEL_CONFIG) == config:
            return []
        if live_kernels(sdir):
            return [f"the shared container '{name}' runs an older image or settings (binds, runtime_args, "
                    "gpu); it is replaced once its kernels have stopped"]
        cli.remove(name)  # idle and outdated: start it again from the new image
        cli.remove_dangling(found[0].image)
    elif found:  # stopped or dead: its kernels died with it
        cli.remove(name)
    for stale in (sdir / "conn").glob("*.json"):
        with contextlib.suppress(OSError):
            stale.unlink()

    labels = _labels(spec, "shared")
    labels.update({LABEL_IDLE: f"{spec.idle_timeout:g}", LABEL_STATE_DIR: str(sdir), LABEL_CONFIG: config})
    argv, warnings = cli.shared_run_argv(spec, name, labels, str(sdir / "conn"))
    run(argv, timeout=300, message=f"could not start the shared container '{name}'")
    return warnings


def shared_config(spec: LaunchSpec) -> str:
    """A digest of what a shared container was started with (besides the image's build)."""
    import hashlib  # why: shared containers only, not on a per-kernel container's start
    import json

    data = [image_name(spec), docker_binds(spec.binds), list(spec.runtime_args), spec.gpu]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def _same_image(a: str, b: str) -> bool:
    # docker prints image IDs as "sha256:<hex>", podman as "<hex>".
    return a.removeprefix("sha256:") == b.removeprefix("sha256:")


def live_kernels(sdir: Path, prune: bool = True) -> list[str]:
    """IDs of the kernels of a shared container whose watcher still runs (stale records are dropped,
    unless not ``prune``)."""
    live = []
    kdir = sdir / "kernels"
    for ref in sorted(kdir.glob("*")) if kdir.is_dir() else []:
        try:
            pid = int(ref.read_text(encoding="utf-8").strip() or "0")
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and procfs.alive(pid):
            live.append(ref.name)
        elif prune:
            with contextlib.suppress(OSError):
                ref.unlink()
    return live


def idle_for(sdir: Path) -> float:
    """Seconds since a kernel last started or ended in a shared container."""
    try:
        return time.time() - (sdir / "last_active").stat().st_mtime
    except OSError:
        return float("inf")


def stop_if_idle(cli: ContainerCLI, name: str, sdir: Path, idle_timeout: float) -> bool:
    """Remove the shared container, and its bookkeeping, when no kernel runs in it and none did for
    ``idle_timeout`` s."""
    with locked(sdir / "lock", timeout=LOCK_TIMEOUT, private=True):
        if live_kernels(sdir) or idle_for(sdir) < idle_timeout - 0.1:
            return False
        cli.remove(name)
        forget_shared(sdir)
        return True


def forget_shared(sdir: Path) -> None:
    """Remove a shared container's bookkeeping directory (call with its lock held, the container gone).

    Only the files we write go; the lock file last (fsutil.locked copes with a lock file removed under a
    waiter); a file we did not write keeps the directory.
    """
    for path in [*(sdir / "conn").glob("*.json"), *(sdir / "kernels").glob("*"), sdir / "last_active"]:
        with contextlib.suppress(OSError):
            path.unlink()
    for child in (sdir / "conn", sdir / "kernels"):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        (sdir / "lock").unlink()
    with contextlib.suppress(OSError):
        sdir.rmdir()


# ----------------------------------------------------------------------------- watcher


def spawn_watcher(args: Sequence[str], env: Mapping[str, str]) -> int:
    """Start ``python -m hpc_kernels.runtimes.docker.watcher ARGS`` (isolated: selfexec.module_argv) in its own session;
    returns its pid."""
    log = paths.private(paths.log_dir()) / "containers.log"
    with os.fdopen(open_private(log), "a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            selfexec.module_argv("hpc_kernels.runtimes.docker.watcher", *args), env=dict(env),
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
        )
    return proc.pid
