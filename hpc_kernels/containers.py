"""Docker/Podman kernels: one container per kernel, or one shared container per user and kernel.

Leak-free by construction. Killing a ``docker run``/``docker exec`` client does not stop what it
started (measured: the container keeps running with its ports open), and jupyter_client's hard kill is
SIGKILL to the launcher's whole process group. So before the launcher ``exec``s the client, it starts a
*watcher* in its own session (outside that group): the watcher blocks on the launcher's pid (a pidfd;
exec keeps the pid) and on the Jupyter process the kernel lives for (``$JPY_PARENT_PID``: the server or
client that started it), and, whichever way the client ends or when that process dies without shutting
the kernel down, removes the kernel's container
(``rm -f``) or, in a shared container, kills the kernel's process and stops the container once it has
been idle for ``idle_timeout`` seconds. ``sweep()`` is the safety net for ``hpc-kernels gc``.

Shared containers keep their bookkeeping in ``<host state dir>/containers/<name>/``: ``conn/`` (bound
into the container: the kernels' connection files), ``kernels/<id>`` (the pid of each kernel's
watcher: a kernel counts as live while its watcher runs), ``last_active`` (mtime) and ``lock``. It is
removed when the container is stopped; gc removes that of a container that is gone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hpc_kernels import gc, paths, procfs, selfexec
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError
from hpc_kernels.launchspec import LaunchSpec
from hpc_kernels.runtimes.docker import (
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
    ContainerInfo,
    docker_binds,
    image_name,
    user_name,
)

LABEL_STATE_DIR = "hpc-kernels.state-dir"
LABEL_CONFIG = "hpc-kernels.config"
#: After the client dies, a container whose create request was still in flight can appear a moment later.
SETTLE_SECONDS = 1.5
#: The longest a process of ours holds a shared container's lock (starting it takes up to 300 s),
#: plus a margin: a longer wait means a stuck process (see hpc_kernels.locks.locked).
LOCK_TIMEOUT = 360.0

Plan = tuple[list[str], dict[str, str], list[str]]


def prepare(spec: LaunchSpec, connection_file: str, environ: Mapping[str, str] | None = None) -> Plan:
    """Get ready to launch ``spec`` and return (argv, env, warnings) for the launcher to ``exec``.

    Starts the watcher (and, in shared mode, the shared container) first, so that no exit path of
    the client it returns can leak a container or a kernel process.
    """
    from hpc_kernels.runtimes.apptainer import container_env

    env = dict(os.environ if environ is None else environ)
    cli = ContainerCLI(spec.runtime, _binary(spec.runtime, env))
    mark_used(cli.name)
    cli.check_host_network()
    image = image_name(spec)
    local = image.startswith(LOCAL_PREFIX)
    image_id = cli.image_id(image) if local or spec.mode == "instance" else None
    if local and image_id is None:
        raise HpcKernelsError(f"the image of kernel '{spec.kernel}' ({image}) does not exist in {cli.name}; "
                              f"build it with 'hpc-kernels build {spec.kernel}'.")
    cenv = container_env(spec, env)
    if spec.mode == "instance":
        return _prepare_shared(cli, spec, connection_file, env, cenv, image_id)
    return _prepare_own(cli, spec, os.path.abspath(connection_file), env, cenv)


def describe(spec: LaunchSpec, connection_file: str, environ: Mapping[str, str] | None = None) -> Plan:
    """What :func:`prepare` would return, without side effects (for ``hpc-kernels show``)."""
    from hpc_kernels.runtimes.apptainer import container_env

    env = dict(os.environ if environ is None else environ)
    cli = ContainerCLI(spec.runtime, _binary(spec.runtime, env))
    cenv = container_env(spec, env)
    if spec.mode == "instance":
        argv = cli.exec_argv(spec, shared_name(spec.kernel), f"{SHARED_CONN_DIR}/<kernel-id>.json", cenv)
        return argv, {**env, **cenv}, []
    labels = _labels(spec, "kernel")
    labels.update({LABEL_PID: "<launcher pid>", LABEL_CONNECTION: connection_file})
    argv, warnings = cli.run_argv(spec, connection_file, f"hpck-{spec.kernel}-<random>", labels, cenv)
    return argv, {**env, **cenv}, warnings


def _binary(runtime: str, env: Mapping[str, str]) -> str:
    from hpc_kernels.runtimes.docker import find_binary

    return find_binary(runtime, env)


def _labels(spec: LaunchSpec, role: str) -> dict[str, str]:
    return {LABEL_KERNEL: spec.kernel, LABEL_ROLE: role, LABEL_HOST: paths.hostname(),
            LABEL_OWNER: user_name()}


def _mark(runtime: str) -> Path:
    return paths.host_state_dir() / "containers" / f".used-{runtime}"


def mark_used(runtime: str) -> None:
    """Remember that a kernel of ours started containers with ``runtime`` on this host: ``gc`` asks that
    runtime for leftovers only then (a kernelspec removed since may have left one behind)."""
    from hpc_kernels.fsutil import open_private

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
    spawn_watcher(["kernel", cli.name, cli.binary, str(os.getpid()), name, _parent_arg()], env)
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
    from hpc_kernels.fsutil import private_dir
    from hpc_kernels.locks import locked

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
             _parent_arg()],
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
    from hpc_kernels.fsutil import private_dir

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
    from hpc_kernels.proc import run

    labels = _labels(spec, "shared")
    labels.update({LABEL_IDLE: f"{spec.idle_timeout:g}", LABEL_STATE_DIR: str(sdir), LABEL_CONFIG: config})
    argv, warnings = cli.shared_run_argv(spec, name, labels, str(sdir / "conn"))
    run(argv, timeout=300, message=f"could not start the shared container '{name}'")
    return warnings


def shared_config(spec: LaunchSpec) -> str:
    """A digest of what a shared container was started with (besides the image's build)."""
    import hashlib
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
    from hpc_kernels.locks import locked

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
    """Start ``python -m hpc_kernels.containers ARGS`` (isolated: selfexec.module_argv) in its own session;
    returns its pid."""
    from hpc_kernels.fsutil import open_private

    log = paths.private(paths.log_dir()) / "containers.log"
    with os.fdopen(open_private(log), "a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            selfexec.module_argv("hpc_kernels.containers", *args), env=dict(env),
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True,
        )
    return proc.pid


def _parent_arg() -> str:
    """``PID:START`` of the Jupyter process the kernel lives for (``$JPY_PARENT_PID``: the server or client
    that started it), ``0:0`` when there is none."""
    ref = procfs.jupyter_parent()
    return f"{ref.pid}:{ref.start}" if ref else "0:0"


def _parse_parent(arg: str) -> procfs.ProcRef | None:
    pid, _, start = arg.partition(":")
    return procfs.ProcRef(int(pid), int(start)) if int(pid) > 1 else None


def wait_for_parent(pid: int, grandparent: procfs.ProcRef | None = None) -> bool:
    """Block until our parent ``pid`` (the launcher, later the client it became) has exited, or until
    ``grandparent`` (the process that started the launcher) has; True in the second case."""
    fds: list[int] = []
    for ref in [procfs.ProcRef(pid, 0), grandparent]:
        if ref is not None:
            with contextlib.suppress(AttributeError, OSError):
                fds.append(os.pidfd_open(ref.pid))
    try:
        while True:
            # Reparented: the launcher died (before we got here, too; its pid may be reused since).
            if os.getppid() != pid:
                return False
            if grandparent is not None and not grandparent.alive():
                return True
            if len(fds) == 1 + (grandparent is not None):
                import select

                select.select(fds, [], [])
            else:  # no pidfds (Linux < 5.3)
                time.sleep(0.5)
    finally:
        for fd in fds:
            os.close(fd)


def _end_client(pid: int, grace: float = 5.0) -> None:
    """After the kernel's container or process was removed, its client exits; SIGKILL it if it has not."""
    me = procfs.proc_ref(pid)
    deadline = time.monotonic() + grace
    while me is not None and me.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if me is not None:
        procfs.kill([me])


def watch_kernel(cli: ContainerCLI, pid: int, name: str, parent: procfs.ProcRef | None = None) -> None:
    """Per-kernel container: once the client is gone, make sure the container is too; once the Jupyter
    process that started the kernel is gone, remove the container (which ends the client)."""
    orphaned = wait_for_parent(pid, parent)
    cli.remove(name)
    if orphaned:
        print(f"hpc-kernels container watcher: container {name}: the process that started it is gone; "
              "removed it", file=sys.stderr, flush=True)
        _end_client(pid)
    time.sleep(SETTLE_SECONDS)
    if cli.inspect([name]):
        cli.remove(name)


def watch_shared(cli: ContainerCLI, pid: int, name: str, kid: str, sdir: Path, idle_timeout: float,
                 parent: procfs.ProcRef | None = None) -> None:
    """Shared container: once the client is gone, or the Jupyter process that started the kernel, kill
    the kernel (exec does not), then idle-stop."""
    from hpc_kernels.locks import locked

    orphaned = wait_for_parent(pid, parent)
    marker = f"{SHARED_CONN_DIR}/{kid}.json"
    kill_kernel_processes(cli, name, marker)
    if orphaned:
        print(f"hpc-kernels container watcher: kernel {kid} in {name}: the process that started it is gone; "
              "ended it", file=sys.stderr, flush=True)
        _end_client(pid)
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
                from hpc_kernels.proc import run

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


# ----------------------------------------------------------------------------- gc


def launcher_alive(info: ContainerInfo) -> bool:
    """Whether the launcher recorded on a per-kernel container still runs (same pid, same start time)."""
    try:
        pid = int(info.labels.get(LABEL_PID, "0"))
    except ValueError:
        return False
    if pid <= 0 or not procfs.alive(pid):
        return False
    recorded = info.labels.get(LABEL_PID_START, "")
    return not recorded or recorded == procfs.start_of(pid)


def sweep(dry_run: bool = False) -> list[gc.Finding]:
    """The ``hpc-kernels gc`` sweeper for Docker/Podman containers (see :func:`sweep_containers`); only
    the runtimes a kernel uses are asked (:func:`hpc_kernels.gc.in_use`)."""
    reason = "per-kernel container whose launcher is gone, or shared container idle past its timeout"
    action = "would remove" if dry_run else "removed"
    runtimes = [r for r in ("podman", "docker") if gc.in_use(r)]
    if not runtimes:
        return []
    found = [gc.Finding("containers", name, action, reason)
             for name in sweep_containers(runtimes, dry_run=dry_run)]
    found += [gc.Finding("containers", str(sdir), "would remove" if dry_run else "removed",
                         "bookkeeping of a shared container that is gone")
              for sdir in sweep_shared_dirs(runtimes, dry_run=dry_run)]
    return found


def sweep_shared_dirs(runtimes: Sequence[str] = ("podman", "docker"), dry_run: bool = False) -> list[Path]:
    """Remove the bookkeeping (``containers/<name>/``) of shared containers that no installed runtime
    has any more (stopped by hand, by a reboot, by a watcher that was killed); the directories removed.
    Judges nothing when a runtime is installed but does not answer."""
    from hpc_kernels.locks import locked

    base = paths.host_state_dir() / "containers"
    dirs = sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    clis: list[ContainerCLI] = []
    for runtime in runtimes if dirs else ():
        try:
            clis.append(ContainerCLI(runtime))
        except RuntimeNotFoundError:
            continue

    def exists(name: str) -> bool:
        # ps fails (ToolError) when a daemon does not answer: then the container may well exist.
        return any(cli.ids(f"name=^{name}$") for cli in clis)

    removed = []
    for sdir in dirs:
        try:
            if exists(sdir.name):
                continue
            if dry_run:
                if not live_kernels(sdir, prune=False):
                    removed.append(sdir)
                continue
            with locked(sdir / "lock", blocking=False, private=True) as held:
                # Re-checked under its lock: a launch may have started it meanwhile (and holds the lock).
                if held and not live_kernels(sdir) and not exists(sdir.name):
                    forget_shared(sdir)
                    removed.append(sdir)
        except ToolError:
            return removed
    return removed


def sweep_containers(runtimes: Sequence[str] = ("podman", "docker"), dry_run: bool = False) -> list[str]:
    """Remove our leftover containers on this host: per-kernel ones whose launcher is gone, and shared
    ones with no live kernel that have been idle past their timeout. Returns the names removed.
    With ``dry_run`` only the per-kernel ones are reported (judging a shared one takes its lock)."""
    removed: list[str] = []
    seen: set[str] = set()
    for runtime in runtimes:
        try:
            cli = ContainerCLI(runtime)
            infos = cli.ours(f"label={LABEL_HOST}={paths.hostname()}", f"label={LABEL_OWNER}={user_name()}")
        except (RuntimeNotFoundError, ToolError):
            continue  # not installed, or no daemon to talk to
        for info in infos:
            if info.id in seen:  # docker pointed at podman's service sees the same containers
                continue
            seen.add(info.id)
            role = info.labels.get(LABEL_ROLE)
            if role == "kernel" and not launcher_alive(info):
                if not dry_run:
                    cli.remove(info.name)
                removed.append(info.name)
            elif role == "shared" and not dry_run:
                sdir = Path(info.labels.get(LABEL_STATE_DIR) or shared_dir(info.name))
                try:
                    idle = float(info.labels.get(LABEL_IDLE, "0"))
                except ValueError:
                    idle = 0.0
                if sdir.is_dir():
                    if stop_if_idle(cli, info.name, sdir, idle):
                        removed.append(info.name)
                else:
                    cli.remove(info.name)
                    removed.append(info.name)
    return removed


# ----------------------------------------------------------------------------- watcher entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpc_kernels.containers kernel|shared RUNTIME BINARY PID NAME [KID DIR IDLE] PARENT``
    (PARENT: ``PID:START`` of the launcher's parent, ``0:0`` for none)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        role, runtime, binary, pid, name = args[:5]
        cli = ContainerCLI(runtime, binary)
        if role == "kernel" and len(args) == 6:
            watch_kernel(cli, int(pid), name, _parse_parent(args[5]))
        elif role == "shared" and len(args) == 9:
            watch_shared(cli, int(pid), name, args[5], Path(args[6]), float(args[7]), _parse_parent(args[8]))
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
