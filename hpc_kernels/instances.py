"""Shared Apptainer instances (``mode: instance``): started on demand, stopped when idle.

Lifecycle, all of it per host (``paths.host_state_dir()/instances/NAME/``):

* The instance **name** encodes user, kernel, node and Slurm job, plus a digest of the image's
  identity (path, inode, size, mtime: a rebuilt image gets a new name) and of everything fixed at
  ``instance start`` (binds, connection directory, GPU flag, runtime args).
* **launch**: under the instance's ``flock``, start the instance if its record is missing or its
  process is gone (8 racing launches start exactly one), make sure its reaper runs, write an
  *attachment* record for this launcher (pid + start time, so pid reuse is harmless), release the
  lock and ``execve`` ``apptainer exec instance://NAME``. The launcher process *becomes* the
  kernel's runtime process, so jupyter_client's kill and liveness checks reach it directly.
* The **reaper** is a small detached process (own session, so SIGKILL of a launcher's process
  group cannot reach it) started with the instance. It prunes attachments whose process is gone,
  kills processes left in the container by those kernels (found by a variable we set in the
  container environment), and stops the instance once no kernel has been attached for
  ``idle_timeout`` seconds. It only ever looks at this host's state, so it never stops an instance
  of another node.

Import-light: the launcher imports this on every instance-mode kernel start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import paths, procfs, selfexec
from hpc_kernels.errors import HpcKernelsError, ToolError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.launchspec import LaunchSpec
from hpc_kernels.locks import locked
from hpc_kernels.procfs import ProcRef, proc_ref
from hpc_kernels.runtimes import apptainer

if TYPE_CHECKING:
    from hpc_kernels.gc import Finding

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


# ----------------------------------------------------------------------------- processes


def marked_processes(instance: str) -> list[tuple[int, str]]:
    """(pid, attachment id) of processes whose environment names ``instance`` (this user's only)."""
    want = f"{ENV_INSTANCE}={instance}".encode()
    prefix = f"{ENV_ATTACHMENT}=".encode()
    found: list[tuple[int, str]] = []
    for pid, environ in procfs.processes("environ"):
        if want in environ:
            ids = [v[len(prefix) :].decode(errors="replace") for v in environ if v.startswith(prefix)]
            found.append((pid, ids[0] if ids else ""))
    return found


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def kill_marked(instance: str, attachments: set[str] | None = None) -> list[int]:
    """SIGKILL processes of ``instance`` (only those of ``attachments`` when given); their pids."""
    killed = []
    for pid, attachment in marked_processes(instance):
        if (attachments is None or attachment in attachments) and _kill(pid):
            killed.append(pid)
    return killed


def helpers_left(record: InstanceRecord, late: bool = False) -> list[procfs.ProcInfo]:
    """Apptainer's helpers an ended instance left behind: a SIGKILL of its starter leaves its
    ``squashfuse_ll`` running, reparented, holding the image (measured with Apptainer 1.4, unprivileged).
    They are the rest of the starter's session; ``late`` (gc) keeps only Apptainer's own helper programs."""
    starter = record.starter
    return procfs.session_leftovers(starter, helpers_only=late) if starter is not None else []


def clear_leftovers(record: InstanceRecord, late: bool = False) -> list[int]:
    """SIGKILL what an ended instance left: its kernels' processes and Apptainer's helpers; their pids."""
    return kill_marked(record.name) + procfs.kill(p.ref for p in helpers_left(record, late))


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
    import pwd

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


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class InstanceRecord:
    """What we know about a running instance (``instance.json``)."""

    name: str
    kernel: str
    image: str
    user: str
    host: str
    job: str
    pid: int
    pid_start: int
    started_at: float
    idle_timeout: float
    binary: str
    #: The instance's ``Apptainer instance: USER [NAME]`` process, parent of ``pid``, and the leader of the
    #: session its helpers (``squashfuse_ll``) run in: a SIGKILL of it leaves them behind (0: unknown).
    starter_pid: int = 0
    starter_start: int = 0

    @property
    def proc(self) -> ProcRef:
        """The instance's process (the one ``--pid-file`` names)."""
        return ProcRef(self.pid, self.pid_start)

    @property
    def starter(self) -> ProcRef | None:
        """The instance's starter, when it was recorded."""
        return ProcRef(self.starter_pid, self.starter_start) if self.starter_pid > 1 else None

    def running(self) -> bool:
        """True while the instance's process lives."""
        return self.proc.alive()


@dataclass(frozen=True)
class Attachment:
    """One kernel attached to an instance (``kernels/ID.json``): its runtime process."""

    id: str
    pid: int
    pid_start: int
    connection_file: str
    attached_at: float
    #: The Jupyter process the kernel lives for ($JPY_PARENT_PID): once it is gone, so is the kernel (0: none).
    parent_pid: int = 0
    parent_start: int = 0

    def alive(self) -> bool:
        """True while the kernel's ``apptainer exec`` (the former launcher) runs."""
        return ProcRef(self.pid, self.pid_start).alive()

    def orphaned(self) -> bool:
        """True when the process that started the kernel has exited (nobody can talk to the kernel now)."""
        return self.parent_pid > 1 and not ProcRef(self.parent_pid, self.parent_start).alive()


def root() -> Path:
    """Where this host's instance state lives."""
    return paths.host_state_dir() / "instances"


def instance_dir(name: str) -> Path:
    """State directory of instance ``name`` (its lock files stay there for its whole life)."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise HpcKernelsError(f"'{name}' is not a valid instance name.")
    return root() / name


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_pid(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_number(v: Any) -> bool:
    # NaN fails ``v >= 0``: a timeout or a time must be a real number.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


#: What each field of a record must be: records are files, and a damaged one must not kill the reaper.
_RECORD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "kernel": _is_str, "image": _is_str,
    "user": _is_str, "host": _is_str, "job": _is_str, "pid": _is_pid, "pid_start": _is_int,
    "started_at": _is_number, "idle_timeout": _is_number, "binary": _is_str,
}
_ATTACHMENT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "pid": _is_pid, "pid_start": _is_int,
    "connection_file": _is_str, "attached_at": _is_number,
}


def _bad_field(data: Any, checks: Mapping[str, Callable[[Any], bool]]) -> str | None:
    """What is wrong with a record's data (None when every field is what we write)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, check in checks.items():
        if key not in data:
            return f"it has no '{key}'"
        if not check(data[key]):
            return f"'{key}' is {data[key]!r}"
    return None


def read_record(d: Path) -> InstanceRecord | None:
    """The instance record in ``d``, or None (missing, unreadable or damaged counts as no instance:
    :func:`record_problem` says which)."""
    data = _load(d / RECORD)
    if data is None or _bad_field(data, _RECORD_CHECKS):
        return None
    try:  # fields with a default may be missing (a record written by an earlier version)
        return InstanceRecord(**{k: data[k] for k in InstanceRecord.__dataclass_fields__ if k in data})
    except TypeError:
        return None


def record_problem(d: Path) -> str | None:
    """Why the instance record in ``d`` exists but cannot be used; None when it is fine or absent."""
    path = d / RECORD
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read the instance record {path}: {exc.strerror}"
    try:
        bad = _bad_field(json.loads(raw), _RECORD_CHECKS)
    except ValueError:
        bad = "not valid JSON"
    return f"the instance record {path} is damaged: {bad}" if bad else None


def attachments(d: Path) -> list[Attachment]:
    """Every attachment record in ``d`` (live or not; damaged ones are skipped)."""
    found = []
    for path in sorted((d / KERNELS).glob("*.json")):
        data = _load(path)
        if data is not None and not _bad_field(data, _ATTACHMENT_CHECKS):
            with contextlib.suppress(TypeError):  # fields with a default may be missing (an earlier version)
                found.append(Attachment(**{k: data[k] for k in Attachment.__dataclass_fields__ if k in data}))
    return found


def _clear_state(d: Path) -> None:
    """Forget an instance's record, attachments and idle mark (the directory and locks stay)."""
    for path in [d / RECORD, d / IDLE, d / "pid", *(d / KERNELS).glob("*.json")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def forget(d: Path) -> None:
    """Remove an instance's state directory (we hold its lock; names change per image and job,
    so directories must not pile up). Removing a lock file is safe: see :func:`_lock`. Files we
    did not write keep the directory."""
    _clear_state(d)
    for child in (d / KERNELS, d / "lock", d / "reaper.lock"):
        with contextlib.suppress(OSError):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


def _lock(path: Path, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
    """An instance's lock: it survives gc removing and recreating the state directory, lives in a
    private directory (another user cannot take it), and is not waited for longer than
    :data:`LOCK_TIMEOUT` (see :func:`hpc_kernels.locks.locked`)."""
    return locked(path, blocking, timeout=LOCK_TIMEOUT, private=True)


# ----------------------------------------------------------------------------- launch


def launch(spec: LaunchSpec, connection_file: str) -> int:
    """Attach a kernel to its shared instance (starting it if needed) and ``execve`` into it.

    Returns only on error.
    """
    if spec.runtime != "apptainer":
        raise HpcKernelsError(
            f"kernel '{spec.kernel}': shared instances are Apptainer's; runtime '{spec.runtime}' "
            "needs its own shared-container support."
        )
    binary = apptainer.find_binary(fallback=spec.runtime_hint)
    environ = dict(os.environ)
    cdir = connection_dir(connection_file)
    draft, _env, _warnings = apptainer.instance_start_command(spec, "NAME", cdir, "PIDFILE", binary, environ)
    ident = identity(spec, draft, environ)
    name = ident.name
    d = instance_dir(name)
    me = proc_ref(os.getpid())
    if me is None:  # pragma: no cover - /proc is not mounted
        raise HpcKernelsError("cannot read /proc/self/stat: instance mode needs Linux /proc.")
    attachment_id = f"{me.pid}-{me.start}"
    paths.private(root())  # per-user state: 0700 from the state directory down (older versions: 0755)
    with _lock(d / "lock"):
        record = read_record(d)
        if record is None or not record.running():
            if record is not None:
                # Dead (killed, node rebooted, stale state): whatever it left behind goes first (maybe
                # long after: from its starter's session only Apptainer's helpers).
                clear_leftovers(record, late=True)
                _clear_state(d)
            argv, start_env, warnings = apptainer.instance_start_command(
                spec, name, cdir, str(d / "pid"), binary, environ
            )
            for warning in warnings:
                print(f"hpc-kernels: warning: {warning}", file=sys.stderr)
            record = _start(spec, ident, d, argv, start_env, binary)
        ensure_reaper(d)
        # The Jupyter process that started us ($JPY_PARENT_PID): when it dies, the reaper ends this kernel.
        parent = procfs.jupyter_parent()
        attachment = Attachment(
            attachment_id, me.pid, me.start, os.path.abspath(connection_file), time.time(),
            parent.pid if parent else 0, parent.start if parent else 0,
        )
        atomic_write(d / KERNELS / f"{attachment_id}.json", json.dumps(asdict(attachment)) + "\n", private=True)
        with contextlib.suppress(FileNotFoundError):
            (d / IDLE).unlink()
    markers = {ENV_INSTANCE: name, ENV_ATTACHMENT: attachment_id}
    exec_argv, env = apptainer.instance_exec_command(spec, name, connection_file, binary, environ, markers)
    os.execve(exec_argv[0], exec_argv, env)
    return 1  # pragma: no cover - execve does not return


def describe(spec: LaunchSpec, connection_file: str) -> tuple[list[str], dict[str, str], list[str]]:
    """What :func:`launch` would run for ``spec`` (for ``hpc-kernels show``): the ``exec instance://``
    command, with the ``instance start`` command as a note when that instance is not running now."""
    from jupyter_core.paths import jupyter_runtime_dir

    if not os.path.exists(spec.image):
        raise HpcKernelsError(f"the instance is named after the image, which is missing ({spec.image}); "
                              f"build it with 'hpc-kernels build {spec.kernel}'.")
    binary = apptainer.find_binary(fallback=spec.runtime_hint)
    environ = dict(os.environ)
    if not os.path.isabs(connection_file):
        # Jupyter writes connection files to its runtime dir: that directory decides the instance.
        connection_file = os.path.join(jupyter_runtime_dir(), connection_file)
    cdir = connection_dir(connection_file)
    draft, _env, warnings = apptainer.instance_start_command(spec, "NAME", cdir, "PIDFILE", binary, environ)
    name = identity(spec, draft, environ).name
    argv, env = apptainer.instance_exec_command(spec, name, connection_file, binary, environ, {})
    record = read_record(instance_dir(name))
    if record is None or not record.running():
        start, _, _ = apptainer.instance_start_command(spec, name, cdir, str(instance_dir(name) / "pid"),
                                                       binary, environ)
        warnings = [*warnings, "instance not running here: the first kernel starts it with: "
                    + " ".join(shlex.quote(a) for a in start)]
    return argv, env, warnings


def _start(spec: LaunchSpec, ident: Identity, d: Path, argv: list[str], env: dict[str, str],
           binary: str) -> InstanceRecord:
    """Start the instance (we hold its lock) and record it."""
    pid_file = d / "pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    try:
        apptainer.start_instance(argv, env, timeout=START_TIMEOUT)
    except ToolError:
        # Apptainer still lists an instance of this name that our record did not know or thought
        # dead (its state outlived a crash): nothing of ours can be attached to it; replace it.
        if not apptainer.list_instances(binary, ident.name):
            raise
        apptainer.stop_instance(binary, ident.name, force=True, timeout=STOP_TIMEOUT)
        apptainer.start_instance(argv, env, timeout=START_TIMEOUT)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise HpcKernelsError(
            f"Apptainer started instance '{ident.name}' but wrote no pid file {pid_file}."
        ) from None
    proc = proc_ref(pid)
    if proc is None:
        raise HpcKernelsError(
            f"instance '{ident.name}' exited right after it started; "
            "see its log in ~/.apptainer/instances/logs."
        )
    starter = _starter_of(proc.pid)
    record = InstanceRecord(
        name=ident.name, kernel=spec.kernel, image=spec.image, user=ident.user, host=ident.host,
        job=ident.job, pid=proc.pid, pid_start=proc.start, started_at=time.time(),
        idle_timeout=spec.idle_timeout, binary=binary,
        starter_pid=starter.pid if starter else 0, starter_start=starter.start if starter else 0,
    )
    atomic_write(d / RECORD, json.dumps(asdict(record), indent=1) + "\n", private=True)
    return record


def _starter_of(pid: int) -> ProcRef | None:
    """The ``Apptainer instance`` process above the instance's ``pid``: it leads the session its helpers
    run in (None when it does not, e.g. another runtime's layout)."""
    me = procfs.info(pid)
    parent = procfs.info(me.ppid) if me is not None and me.ppid > 1 else None
    if parent is None or parent.zombie or parent.sid != parent.pid:
        return None
    return parent.ref


# ----------------------------------------------------------------------------- reaper


def reaper_running(d: Path) -> bool:
    """True when a reaper holds ``d/reaper.lock`` (creates nothing: ``d`` may be going away)."""
    try:
        fd = os.open(d / "reaper.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_reaper(d: Path) -> bool:
    """Start the reaper of ``d`` unless one runs; True when one was started."""
    if reaper_running(d):
        return False
    spawn_reaper(d)
    return True


def spawn_reaper(d: Path) -> None:
    """Start the reaper (``python -m hpc_kernels.instances reap DIR``, run as selfexec.module_argv does)
    fully detached (selfexec.spawn_detached: its own session keeps it out of the launcher's process
    group, which jupyter_client kills; the double fork keeps it from lingering as a zombie child of the
    kernel's runtime process). Its log is private, like the rest of the per-user state."""
    log = paths.private(root()) / "reaper.log"
    selfexec.spawn_detached(selfexec.module_argv("hpc_kernels.instances", "reap", str(d)), str(log))


def _take_reaper_lock(d: Path, attempts: int = 10) -> int | None:
    """The reaper's lifetime lock (an open fd holding ``flock``), or None if another reaper has it.

    A launch checking "is a reaper running?" holds it for an instant; retrying briefly keeps a
    reaper that starts at that very instant from giving up.
    """
    path = d / "reaper.lock"
    for _attempt in range(attempts):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the instance was forgotten before this reaper started
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.05)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed or replaced under us: look again
    return None


def poll_interval(idle_timeout: float) -> float:
    """How often the reaper looks: often enough for the timeout, never a busy loop."""
    return min(max(idle_timeout / 4, 0.25), 2.0)


def prune(d: Path, name: str) -> list[Attachment]:
    """Drop attachments whose kernel is gone, kill what those kernels left behind; the live ones."""
    live: list[Attachment] = []
    dead: list[Attachment] = []
    for att in attachments(d):
        if att.alive() and att.orphaned():
            end_orphan(att)
            _log(f"kernel {att.id} of {name}: the process that started it ({att.parent_pid}) is gone; ended it")
        (live if att.alive() else dead).append(att)
    if dead:
        # A kernel whose runtime process died may have left processes in the container
        # (a daemonised child, or a kernel that outlived a SIGKILLed runtime): they carry its id.
        kill_marked(name, {a.id for a in dead})
        for att in dead:
            with contextlib.suppress(FileNotFoundError):
                (d / KERNELS / f"{att.id}.json").unlink()
    return live


def end_orphan(att: Attachment, grace: float = ORPHAN_GRACE) -> None:
    """End a kernel whose Jupyter process died without shutting it down: SIGTERM to its runtime process
    (Apptainer passes it on to the kernel), SIGKILL after ``grace`` seconds."""
    proc = ProcRef(att.pid, att.pid_start)
    procfs.kill([proc], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    procfs.kill([proc])


def reap(d: Path) -> int:
    """The reaper loop of instance dir ``d``: returns when the instance is stopped or gone.

    Every decision to exit is re-checked under the instance lock, and the reaper lock is released
    *before* the instance lock: a launch that starts a new instance after that sees no reaper and
    starts one, and a launch that came before is visible in the record we re-checked.
    """
    fd = _take_reaper_lock(d)
    if fd is None:
        return 0  # another reaper serves this instance
    try:
        idle_since: float | None = None
        seen_pid = 0
        while True:
            record = read_record(d)
            if record is None or not record.running():
                with _lock(d / "lock"):
                    again = read_record(d)
                    if again is None or (record is not None and again.pid == record.pid):
                        if again is not None:  # died behind our back: clear what it left
                            clear_leftovers(again)
                            _log(f"instance {again.name} is gone; state cleared")
                        else:
                            problem = record_problem(d)
                            if problem:
                                _log(f"{problem}; stopping instance {d.name}: {_stop_damaged(d)}")
                        forget(d)
                        os.close(fd)
                        fd = -1
                        return 0
                continue  # a launch started a new instance meanwhile: serve it
            if record.pid != seen_pid:  # a new instance under the same name: start over
                seen_pid, idle_since = record.pid, None
            live = prune(d, record.name)
            now = time.time()
            if live:
                idle_since = None
            elif idle_since is None:
                idle_since = now
                atomic_write(d / IDLE, f"{now}\n", private=True)
            if idle_since is not None and now - idle_since >= record.idle_timeout:
                with _lock(d / "lock"):
                    # A launch may have attached while we waited for the lock: it holds it while it writes.
                    again = read_record(d)
                    if again is not None and again.pid == record.pid and not prune(d, record.name):
                        _stop_locked(d, again)
                        _log(f"instance {record.name} idle for {record.idle_timeout:g} s: stopped")
                        os.close(fd)
                        fd = -1
                        return 0
                idle_since = None
            time.sleep(poll_interval(record.idle_timeout))
    finally:
        if fd >= 0:
            os.close(fd)


def _stop_damaged(d: Path) -> str:
    """Stop the instance of ``d`` by its name (we hold its lock), whose record is damaged: without the
    record nothing can tell when it is idle, and nothing would ever stop it. Says what happened."""
    name = d.name
    kill_marked(name)
    try:
        binary = apptainer.find_binary()
        if not apptainer.list_instances(binary, name):
            return "it was not running"
        stopped = apptainer.stop_instance(binary, name, force=True, timeout=STOP_TIMEOUT)
    except HpcKernelsError as exc:
        return f"could not stop it ({exc})"
    return "stopped" if stopped else "Apptainer refused to stop it"


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hpc-kernels reaper[{os.getpid()}]: {message}", flush=True)


# ----------------------------------------------------------------------------- stop, status


@dataclass(frozen=True)
class InstanceStatus:
    """One of our instances on this host, as ``hpc-kernels instances`` shows it."""

    name: str
    kernel: str
    image: str
    state: str  # running | dead
    pid: int
    kernels: int
    started_at: float
    idle_since: float | None
    idle_timeout: float
    reaper: bool

    def idle_for(self, now: float | None = None) -> float | None:
        """Seconds without any kernel attached (None while kernels are attached)."""
        if self.kernels or self.idle_since is None:
            return None
        return max(0.0, (now or time.time()) - self.idle_since)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for ``--json``."""
        data = asdict(self)
        data["idle_for"] = self.idle_for(now)
        return data


def status(d: Path) -> InstanceStatus | None:
    """The status of the instance recorded in ``d`` (read-only: prunes nothing)."""
    record = read_record(d)
    if record is None:
        return None
    found = attachments(d)
    live = [a for a in found if a.alive()]
    idle_since: float | None = None
    if not live:
        try:
            data = (d / IDLE).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            data = ""
        try:
            idle_since = float(data)
        except ValueError:
            # The reaper has not looked yet: a kernel that just ended, or none ever attached.
            idle_since = time.time() if found else record.started_at
    return InstanceStatus(
        name=record.name, kernel=record.kernel, image=record.image,
        state="running" if record.running() else "dead", pid=record.pid, kernels=len(live),
        started_at=record.started_at, idle_since=idle_since, idle_timeout=record.idle_timeout,
        reaper=reaper_running(d),
    )


def instance_dirs() -> list[Path]:
    """State directories of this host's instances (with or without a live record)."""
    base = root()
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def list_instances() -> list[InstanceStatus]:
    """Our instances on this host (other nodes' instances live in other host dirs)."""
    found = []
    for d in instance_dirs():
        st = status(d)
        if st is not None:
            found.append(st)
    return found


def damaged_records() -> list[str]:
    """One sentence per instance of this host whose record is damaged (``list_instances`` skips them;
    ``hpc-kernels gc`` stops such an instance)."""
    found = []
    for d in instance_dirs():
        problem = record_problem(d) if read_record(d) is None else None
        if problem:
            found.append(f"{problem}; 'hpc-kernels gc' stops instance {d.name} and removes it.")
    return found


def _stop_locked(d: Path, record: InstanceRecord) -> int:
    """Stop the instance of ``record`` (we hold its lock) and everything attached; kernels it had."""
    if record.host != paths.hostname():  # pragma: no cover - host dirs make this impossible
        raise HpcKernelsError(f"instance '{record.name}' belongs to node {record.host}, not this one.")
    attached = [a for a in attachments(d) if a.alive()]
    if record.running():
        binary = record.binary if os.access(record.binary, os.X_OK) else apptainer.find_binary()
        stopped = apptainer.stop_instance(binary, record.name, timeout=STOP_TIMEOUT)
        if not stopped or record.running():
            apptainer.stop_instance(binary, record.name, force=True, timeout=STOP_TIMEOUT)
        if record.running():
            _kill(record.pid)
    # Stopping the instance ends its PID namespace, hence the kernels in it; their runtime
    # processes (the former launchers) and anything marked are killed too, to be sure.
    for att in attached:
        if att.alive():
            _kill(att.pid)
    clear_leftovers(record)
    forget(d)
    return len(attached)


@dataclass(frozen=True)
class Stopped:
    """What ``stop`` did to one instance."""

    name: str
    was_running: bool
    kernels: int  # attached when it was stopped (they are gone now)


def stop(name: str) -> Stopped:
    """Stop our instance ``name`` on this host, killing the kernels attached to it."""
    d = instance_dir(name)
    with _lock(d / "lock"):
        record = read_record(d)
        if record is None:
            raise HpcKernelsError(f"no instance named '{name}' on this node ({paths.hostname()}); "
                                  "see 'hpc-kernels instances'.")
        was_running = record.running()
        kernels = _stop_locked(d, record)
    return Stopped(name, was_running, kernels)


def resolve_names(names: list[str], all_: bool) -> list[str]:
    """Instance names for ``stop``: instance names as given, a kernel name meaning all its instances."""
    known = list_instances()
    if all_:
        return [s.name for s in known]
    chosen: list[str] = []
    for name in names:
        matches = [s.name for s in known if name in (s.name, s.kernel)]
        if not matches:
            raise HpcKernelsError(f"no instance or kernel named '{name}' has an instance on this node "
                                  f"({paths.hostname()}); see 'hpc-kernels instances'.")
        chosen += [m for m in matches if m not in chosen]
    return chosen


# ----------------------------------------------------------------------------- gc sweepers


def sweep_state(dry_run: bool = False) -> list[Finding]:
    """gc: forget dead instances, restart missing reapers, stop untracked instances named like ours."""
    from hpc_kernels.gc import Finding

    found: list[Finding] = []
    tracked = set()
    for d in instance_dirs():
        tracked.add(d.name)
        record = read_record(d)
        if record is not None and record.running():
            if not reaper_running(d):
                found.append(Finding("instances", d.name, "restarted its reaper",
                                     "no process would stop it when idle"))
                if not dry_run:
                    spawn_reaper(d)
            continue
        problem = record_problem(d) if record is None else None
        if problem:  # without its record nothing can tell when it is idle: stop it by name
            findings = [Finding("instances", d.name, "stopped", f"{problem}; its state is removed too")]
        else:
            why = "instance not running" if record is not None else "no instance record"
            findings = [Finding("instances", d.name, "removed stale state", why)]
        # Its kernels' processes are the "orphans" sweeper's (after this one); Apptainer's helpers are ours.
        helpers = helpers_left(record, late=True) if record is not None else []
        findings += [Finding("orphans", f"pid {p.pid}", "killed",
                             f"{p.comm} of instance {d.name}, which is not running") for p in helpers]
        if dry_run:
            found += findings
            continue
        with _lock(d / "lock", blocking=False) as held:
            if not held:  # a launch is starting it right now
                continue
            again = read_record(d)
            if again is not None and again.running():
                continue
            procfs.kill(p.ref for p in helpers)
            if again is None and record_problem(d):
                _stop_damaged(d)
            forget(d)
            found += findings
    found += _sweep_untracked(tracked, dry_run)
    return found


def our_name_pattern(user: str, host: str, owner: str) -> re.Pattern[str]:
    """Names this state tree would give this user's instances on this host."""
    head = f"{re.escape(NAME_PREFIX)}.+-{re.escape(_clean(user))}-{re.escape(_clean(host))}"
    return re.compile(rf"^{head}(-j[A-Za-z0-9._]+)?-{owner}[0-9a-f]{{{DIGEST_LEN}}}$")


def _sweep_untracked(tracked: set[str], dry_run: bool) -> list[Finding]:
    from hpc_kernels.gc import Finding, in_use

    if not in_use("apptainer"):  # no kernel of ours uses Apptainer: none of its instances can be ours
        return []
    try:
        binary = apptainer.find_binary()
    except HpcKernelsError:
        return []
    pattern = our_name_pattern(user_name(), paths.hostname(), owner_tag())
    found = []
    for listed in apptainer.list_instances(binary):
        if listed.name in tracked or not pattern.match(listed.name):
            continue
        found.append(Finding("instances", listed.name, "stopped",
                             "an instance of ours with no state: no reaper watches it"))
        if not dry_run:
            apptainer.stop_instance(binary, listed.name, timeout=STOP_TIMEOUT)
            kill_marked(listed.name)
    return found


def sweep_orphans(dry_run: bool = False) -> list[Finding]:
    """gc: kill kernel processes whose instance is gone or whose own attachment has ended."""
    from hpc_kernels.gc import Finding

    names: set[str] = set()
    want = f"{ENV_INSTANCE}=".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        names.update(v[len(want) :].decode(errors="replace") for v in env if v.startswith(want))
    # Only names this state tree gives: processes of instances another state tree tracks are not ours.
    ours = our_name_pattern(user_name(), paths.hostname(), owner_tag())
    found: list[Finding] = []
    for name in sorted(n for n in names if NAME_RE.match(n) and ours.match(n)):
        for pid in _orphans_of(name):
            found.append(Finding("orphans", f"pid {pid}", "killed",
                                 f"kernel process of {name}, whose kernel has ended"))
            if not dry_run:
                _kill(pid)
    return found


def _orphans_of(name: str) -> list[int]:
    """Processes marked with instance ``name`` that no live attachment of a running instance owns."""
    d = root() / name
    if not d.is_dir():  # no state at all: nothing of ours can own them (and create no dir for them)
        return [pid for pid, _att in marked_processes(name)]
    with _lock(d / "lock", blocking=False) as held:
        if not held:  # a launch or stop is busy with this instance: look again next time
            return []
        record = read_record(d)
        live = {a.id for a in attachments(d) if a.alive()} if record and record.running() else set()
        return [pid for pid, att in marked_processes(name) if att not in live]


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_kernels.instances reap DIR``: the detached reaper."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "reap":
        print("usage: python -m hpc_kernels.instances reap INSTANCE_DIR", file=sys.stderr)
        return 2
    # A reaper outlives terminals and kernels; only an explicit SIGTERM/SIGKILL should end it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return reap(Path(args[1]))
    except HpcKernelsError as exc:
        _log(f"error: {exc}")
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        _log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
