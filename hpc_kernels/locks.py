"""Locks: :func:`locked` (``flock``, per-user state on one node) and :func:`cluster_lock` (a lock file created
with ``link``, whose holder, host and heartbeat are recorded in it: what several users on several nodes share,
where Lustre may give ``flock`` only node-local semantics)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_kernels import paths, procfs
from hpc_kernels.errors import LockBusyError
from hpc_kernels.fsutil import PRIVATE_FILE, Share, make_dirs, private_dir, share_for, tighten_fd


@dataclass(frozen=True)
class LockHolder:
    """The process that holds a ``flock``, as ``/proc/locks`` names it (uid None: not visible to us)."""

    pid: int
    uid: int | None

    def describe(self) -> str:
        """``pid 123 of user bob`` (or of uid N, or without a user when /proc hides it)."""
        if self.uid is None:
            return f"pid {self.pid}"
        from hpc_kernels import access  # why: kernel starts take locks; only a busy one names its holder

        user = access.user_name(self.uid)
        return f"pid {self.pid} of user {user}" if self.uid != os.getuid() else f"pid {self.pid} (yours)"


def lock_holder(fd: int, proc_locks: str = "/proc/locks") -> LockHolder | None:
    """Who holds the ``flock`` on the file open at ``fd``, from ``/proc/locks``; None when unknown
    (no /proc, another pid namespace, a network filesystem's lock held on another node)."""
    try:
        st = os.fstat(fd)
        with open(proc_locks, encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF" ("1: -> FLOCK ..." are waiters, not holders).
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want and fields[4].isdigit():
            pid = int(fields[4])
            if pid <= 0:
                return None
            try:
                uid: int | None = os.stat(f"/proc/{pid}").st_uid
            except OSError:  # gone meanwhile, or /proc hides other users' processes (hidepid)
                uid = None
            return LockHolder(pid, uid)
    return None


def _busy(path: Path, holder: LockHolder | None, waited: float | None) -> LockBusyError:
    who = holder.describe() if holder else "a process this node cannot name"
    if holder is not None and holder.uid is not None and holder.uid != os.getuid():
        return LockBusyError(
            f"the lock {path} is held by another user's process ({who}); hpc-kernels does not wait for "
            "other users' locks: try again once it is released, or ask its owner to end that process."
        )
    after = f" for {waited:g} s" if waited is not None else ""
    return LockBusyError(
        f"the lock {path} is held by another process ({who}) and was not released{after}; if that "
        "process is stuck, end it (or remove the lock file when no such process runs) and try again."
    )


@contextlib.contextmanager
def locked(path: Path, blocking: bool = True, *, timeout: float | None = None,
           private: bool = False) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False (not held) when busy and not blocking.

    Blocking, the wait is bounded by ``timeout`` seconds (None: as long as the holder is one of our
    own processes); a lock another user's process holds is never waited for: both raise
    :class:`~hpc_kernels.errors.LockBusyError` naming the holder when ``/proc/locks`` tells it.
    ``private``: per-user state, the directory 0700 and the lock file 0600.

    Survives the lock file being removed and recreated meanwhile (gc removes state directories):
    after locking, the path must still name the file we locked, else we lock the new one, so two
    processes never both think they hold the lock. The holder's pid is written into the file.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if private:
            private_dir(path.parent)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE if private else 0o644)
        except FileNotFoundError:  # the directory was removed between mkdir and open: again
            continue
        try:
            if private:
                tighten_fd(fd)
            if not _acquire(fd, path, blocking, deadline, timeout):
                yield False
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                yield True
                return
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _acquire(fd: int, path: Path, blocking: bool, deadline: float | None, timeout: float | None) -> bool:
    """Take the flock on ``fd``: False when busy and not ``blocking``; raise LockBusyError when the
    holder is another user's process or ``deadline`` passes."""
    pause, next_look = 0.02, 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not blocking:
                return False
        now = time.monotonic()
        if now >= next_look:  # who holds it (a cheap read, but not at every poll)
            holder = lock_holder(fd)
            if holder is not None and holder.uid is not None and holder.uid != os.getuid():
                raise _busy(path, holder, None)
            next_look = now + 1.0
        if deadline is not None and now >= deadline:
            raise _busy(path, lock_holder(fd), timeout)
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - now)))
        pause = min(pause * 2, 0.25)


#: A held :func:`cluster_lock` is touched this often (seconds) ...
LOCK_HEARTBEAT = 15.0


#: ... and one of another host that was not touched for this long is taken for dead (its node crashed,
#: its job was killed). Generous: attribute caches of NFS and Lustre clients lag by seconds.
LOCK_STALE_AFTER = 120.0


@dataclass(frozen=True)
class LockRecord:
    """Who holds a :func:`cluster_lock`: written into the lock file itself, so any node can read it."""

    host: str
    pid: int
    start: int | None  # the process's start time (clock ticks since boot): a reused pid is not the holder
    boot: str  # the boot id of the holder's host: a pid of an earlier boot is not the holder either
    uid: int
    user: str
    since: float
    token: str

    def describe(self) -> str:
        """``pid 123 of user bob on node cn12, since 14:02:11``."""
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        mine = self.uid == os.getuid()
        who = f"pid {self.pid}" + ("" if mine else f" of user {self.user}")
        return f"{who} on {self.host}, since {when}"

    def to_text(self) -> str:
        """The lock file's content (one JSON object)."""
        return json.dumps({"generator": "hpc-kernels", "host": self.host, "pid": self.pid, "start": self.start,
                           "boot": self.boot, "uid": self.uid, "user": self.user, "since": self.since,
                           "token": self.token}) + "\n"

    @classmethod
    def read(cls, path: Path) -> LockRecord | None:
        """The record in ``path``; None when it is gone, unreadable or not (yet) a whole record."""
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                data = json.loads(fh.read(4096))
            start = data.get("start")
            return cls(str(data["host"]), int(data["pid"]), int(start) if isinstance(start, int) else None,
                       str(data.get("boot", "")), int(data["uid"]), str(data.get("user", data["uid"])),
                       float(data["since"]), str(data["token"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _start(pid: int) -> int | None:
    """The start time of the live process ``pid`` (clock ticks since boot); None when it is gone or hidden."""
    ref = procfs.proc_ref(pid)
    return ref.start if ref is not None else None


def _holder_alive(record: LockRecord) -> bool:
    """For a record of this host: does its process still run (the same process, in this boot)?"""
    if record.boot and procfs.boot_id() and record.boot != procfs.boot_id():
        return False
    start = _start(record.pid)
    if start is None:
        try:  # /proc may hide other users' processes (hidepid): the kernel still knows
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return record.start is None or start == record.start


def flock_held(path: Path) -> bool:
    """True while some process holds the ``flock`` on ``path``; creates nothing (a file that cannot be
    opened — gone, or its directory going away — has no holder we could see)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


def dead_local_holder(path: Path) -> LockRecord | None:
    """The record of the cluster lock ``path`` when its holder ran on this host and is gone (a killed
    process left the file: the next taker removes it, and so does ``gc``); None otherwise."""
    holder = LockRecord.read(path)
    if holder is None or holder.host != paths.hostname() or _holder_alive(holder):
        return None
    return holder


@contextlib.contextmanager
def cluster_lock(path: Path, *, wait: bool = True, on_wait: Callable[[LockRecord | None], None] | None = None,
                 stale_after: float = LOCK_STALE_AFTER, heartbeat: float = LOCK_HEARTBEAT) -> Iterator[LockRecord]:
    """Hold ``path`` as an exclusive lock that works across users and across nodes of a shared file system.

    ``flock`` on Lustre may be node-local (mounted ``localflock``), and two nodes would both think they hold
    it. This lock is the file itself: our record (host, pid, its start time, boot id, user, a token) is
    written to a file of a unique name and hard-linked to ``path``, which is atomic on NFS and Lustre (a
    file system without hard links gets an ``O_EXCL`` create). While held, the file is touched every
    ``heartbeat`` seconds. A holder on this host that is gone (pid, start time, boot id) releases it at
    once; one on another host when the file was not touched for ``stale_after`` seconds, measured by the
    file system's own clock. Stale locks are taken over by a rename, so two waiters never both win.

    Blocking (``wait``): waits as long as the holder is alive (whichever user: a build of a shared image
    is worth waiting for), calling ``on_wait(holder)`` once. Otherwise raises
    :class:`~hpc_kernels.errors.LockBusyError` naming the holder. Yields our record.
    """
    from hpc_kernels import access  # why: kernel starts import this module; cluster locks are builds'

    host = paths.hostname()
    token = secrets.token_hex(8)
    record = LockRecord(host, os.getpid(), _start(os.getpid()), procfs.boot_id(), os.getuid(),
                        access.user_name(os.getuid()), time.time(), token)
    share = share_for(path.parent)
    make_dirs(path.parent, share)
    mine = path.with_name(f"{path.name}.{host}.{os.getpid()}.{token}")
    _write_exclusive(mine, record.to_text(), share)
    try:
        told = False
        pause = 0.05
        while not _link(mine, path, record.to_text(), share):
            holder = LockRecord.read(path)
            if _stale(holder, path, mine, stale_after):
                _take_over(path, holder, token)
                continue
            if not wait:
                who = holder.describe() if holder else "a process whose record cannot be read"
                raise LockBusyError(f"the lock {path} is held by {who}.", holder=who)
            if not told and on_wait is not None:
                on_wait(holder)
            told = True
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(mine)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat):
            with contextlib.suppress(OSError):
                os.utime(path)

    beater = threading.Thread(target=beat, name="hpck-lock-heartbeat", daemon=True)
    beater.start()
    try:
        yield record
    finally:
        stop.set()
        beater.join()
        current = LockRecord.read(path)
        if current is not None and current.token == token:  # never remove a lock someone took over
            with contextlib.suppress(OSError):
                os.unlink(path)


def _write_exclusive(path: Path, text: str, share: Share | None) -> None:
    mode = share.file_mode(0o644) if share is not None else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)  # exactly, whatever the umask: others read who holds the lock
    finally:
        os.close(fd)
    if share is not None:
        share.own(path)


def _link(mine: Path, path: Path, text: str, share: Share | None) -> bool:
    """Make ``path`` the lock: True when we got it."""
    try:
        os.link(mine, path)
        return True
    except FileExistsError:
        # NFS may report EEXIST for a link whose first request succeeded and whose reply was lost.
        with contextlib.suppress(OSError):
            return os.stat(mine).st_nlink >= 2
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # no hard links here: an exclusive create (atomic on NFSv3+ and Lustre), then the record
        _write_exclusive(path, text, share)
    except FileExistsError:
        return False
    return True


def _stale(holder: LockRecord | None, path: Path, probe: Path, stale_after: float) -> bool:
    """Whether the lock at ``path`` is left over: its holder on this host is gone, or (another host, or a
    record that cannot be read) the file was not touched for ``stale_after`` seconds."""
    if holder is not None and holder.host == paths.hostname():
        return not _holder_alive(holder)
    try:
        os.utime(probe)  # our own file, touched now: the file system's clock, not this node's
        age = os.stat(probe).st_mtime - os.stat(path).st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: take it on the next round
    return age > stale_after


def _take_over(path: Path, holder: LockRecord | None, token: str) -> None:
    """Remove the stale lock ``path`` (held by ``holder``) by renaming it aside, so that of several waiters
    exactly one moves it; if what we moved is a live lock taken meanwhile, it is put back."""
    aside = path.with_name(f"{path.name}.stale.{paths.hostname()}.{os.getpid()}.{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = LockRecord.read(aside)
    if moved is not None and (holder is None or moved.token != holder.token):
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(OSError):
        os.unlink(aside)
