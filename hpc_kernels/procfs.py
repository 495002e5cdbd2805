"""Reading other processes from /proc (Linux): how the processes of a kernel are found, alive or left behind.

Processes are pinned by their start time (:class:`ProcRef`), so a recycled pid never passes for one we
recorded. Import-light: the launcher uses this on every kernel start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

#: Helper programs Apptainer runs beside a container, by ``comm`` (``Apptainer runtime parent: IMAGE`` and
#: ``Apptainer instance: USER [NAME]`` are both ``starter``; unprivileged SIF mounts are ``squashfuse_ll``).
RUNTIME_HELPERS = frozenset({"starter", "starter-suid", "squashfuse_ll", "squashfuse", "fuse-overlayfs",
                             "fuse2fs", "gocryptfs"})


@dataclass(frozen=True)
class ProcRef:
    """A process, pinned by its start time so that a recycled pid never passes for it."""

    pid: int
    start: int

    def alive(self) -> bool:
        """True while the very same process runs (zombies count as dead)."""
        current = proc_ref(self.pid)
        return current is not None and current.start == self.start

    def ended(self) -> bool:
        """True once it has exited, whether reaped or still a zombie (then its pid is not anyone else's)."""
        now = info(self.pid)
        return now is None or (now.start == self.start and now.zombie)


@dataclass(frozen=True)
class ProcInfo:
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgid: int
    sid: int
    start: int

    @property
    def ref(self) -> ProcRef:
        """This process, pinned."""
        return ProcRef(self.pid, self.start)

    @property
    def zombie(self) -> bool:
        """Exited, not yet reaped by its parent."""
        return self.state in ("Z", "X")


def info(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` of any process (zombies included), or None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    close = stat.rfind(")")
    fields = stat[close + 2 :].split()
    if len(fields) < 20:
        return None
    try:
        return ProcInfo(pid, stat[stat.find("(") + 1 : close], fields[0], int(fields[1]), int(fields[2]),
                        int(fields[3]), int(fields[19]))
    except ValueError:
        return None


def proc_ref(pid: int) -> ProcRef | None:
    """The live (non-zombie) process ``pid`` with its start time, or None."""
    found = info(pid)
    return None if found is None or found.zombie else found.ref


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead): the one liveness test of the package."""
    return pid > 0 and proc_ref(pid) is not None


def start_of(pid: int) -> str:
    """A process's start time as text (clock ticks since boot; "" if there is no such live process)."""
    ref = proc_ref(pid)
    return str(ref.start) if ref else ""


def boot_id() -> str:
    """This boot's id ("" where /proc does not say): a pid and start time mean the same process only within
    one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pids() -> Iterator[int]:
    """Every pid in /proc but our own."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            yield int(entry.name)


def processes(part: str) -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, fields)`` of every other process whose ``/proc/<pid>/<part>`` (``cmdline``,
    ``environ``) we may read, split at NUL bytes; processes that vanish or are not ours are skipped."""
    for pid in pids():
        try:
            with open(f"/proc/{pid}/{part}", "rb") as fh:
                yield pid, fh.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue


def is_ours(pid: int) -> bool:
    """True when ``pid`` runs as our user (only those may be signalled, and only those are ours to judge)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The children of ``pid`` (of every thread: a Go program such as Apptainer's starter forks from any)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                found += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[ProcInfo]:
    """Every live descendant of ``pid`` (not ``pid`` itself), breadth first."""
    found: list[ProcInfo] = []
    seen = {pid}
    queue = [pid]
    while queue:
        for child in children(queue.pop(0)):
            if child in seen:
                continue
            seen.add(child)
            got = info(child)
            if got is not None and not got.zombie:
                found.append(got)
                queue.append(child)
    return found


def session(sid: int) -> list[ProcInfo]:
    """Our live processes in session ``sid`` (ourselves excepted)."""
    found = []
    for pid in pids():
        got = info(pid)
        if got is not None and got.sid == sid and not got.zombie and is_ours(pid):
            found.append(got)
    return found


def session_leftovers(leader: ProcRef, helpers_only: bool = False) -> list[ProcInfo]:
    """What is left of the session ``leader`` led, once it has ended.

    A session's id is its leader's pid, and the kernel does not hand that pid out again while any process
    is still in the session: so when the leader has exited (gone, or a zombie with its start time), every
    process in session ``leader.pid`` was started inside that session. Empty while the leader lives, or
    when its pid already names another process. ``helpers_only`` keeps Apptainer's own helpers
    (:data:`RUNTIME_HELPERS`) started after the leader: for a caller that comes late (``hpc-kernels gc``),
    when the pid may have led a second session since.
    """
    if not leader.ended():
        return []
    found = session(leader.pid)
    if helpers_only:
        found = [p for p in found if p.comm in RUNTIME_HELPERS and p.start >= leader.start]
    return found


def jupyter_parent(environ: Mapping[str, str] | None = None) -> ProcRef | None:
    """The process a kernel lives for: ``$JPY_PARENT_PID``, which jupyter_client sets to its own pid when
    it starts a kernel (the Jupyter server, or a client such as nbclient). A host ipykernel exits when that
    process is gone; so do ours. None when unset (a kernel started on purpose to outlive its starter)."""
    value = (os.environ if environ is None else environ).get("JPY_PARENT_PID", "")
    pid = int(value) if value.isdigit() else 0
    return proc_ref(pid) if pid > 1 else None


def marked(name: str, value: str) -> list[int]:
    """Our processes whose environment has ``name=value`` (inherited by everything a kernel starts)."""
    want = f"{name}={value}".encode()
    return [pid for pid, environ in processes("environ") if want in environ]


def kill(refs: Iterable[ProcRef], sig: int | None = None) -> list[int]:
    """Send ``sig`` (default SIGKILL) to each process that still is the one recorded; the pids signalled."""
    import signal  # not on the launcher's path: ~0.4 ms under python -S

    sig = signal.SIGKILL if sig is None else sig
    done = []
    for ref in refs:
        # A pidfd pins the process: checked, then signalled, it cannot have been replaced in between.
        try:
            fd = os.pidfd_open(ref.pid)
        except (AttributeError, OSError):  # Linux < 5.3, or gone
            fd = -1
        try:
            if not ref.alive():
                continue
            if fd >= 0:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(ref.pid, sig)
        except (ProcessLookupError, PermissionError):
            continue
        finally:
            if fd >= 0:
                os.close(fd)
        done.append(ref.pid)
    return done
