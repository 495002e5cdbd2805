"""Atomic file writes, private directories, group directories and locks: no half-written file, ever, no
state another user can read or lock, and what is published in a group directory readable by its group.

Two kinds of lock: :func:`locked` (``flock``, per-user state on one node) and :func:`cluster_lock` (a
lock file created with ``link``, whose holder, host and heartbeat are recorded in it: what several users
on several nodes share, where Lustre may give ``flock`` only node-local semantics)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_kernels.errors import LockBusyError

#: Per-user state: directories only we can enter, files only we can read (whatever the umask).
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path, top: Path | None = None) -> Path:
    """Make ``path`` an existing directory of mode 0700 (regardless of the umask); returns it.

    Missing directories are created 0700 (as the XDG base directory spec asks, ancestors too).
    Existing ones from ``top`` (default: ``path`` itself) down to ``path`` that we own and that
    others can enter are tightened: older versions created them 0755. Directories above ``top``,
    and directories of other users, are left as they are.
    """
    path = Path(os.path.abspath(path))
    top = path if top is None else Path(os.path.abspath(top))
    for directory in [*reversed(path.parents), path]:
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            if directory == top or top in directory.parents:
                _tighten(directory)
            continue
        except OSError:
            if directory.is_dir():  # e.g. EACCES on an ancestor that exists: nothing to create
                continue
            raise
        with contextlib.suppress(OSError):  # the umask may have taken bits away: set them exactly
            os.chmod(directory, PRIVATE_DIR)
    return path


def _tighten(directory: Path) -> None:
    with contextlib.suppress(OSError):
        st = os.stat(directory)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(directory, stat.S_IMODE(st.st_mode) & ~0o077)


# ----------------------------------------------------------------------------- group directories


@dataclass(frozen=True)
class Share:
    """How files are published in a group directory (setgid, as DRAC's ``/project/def-pi``): owned by the
    directory's group, readable by that group when the directory is, group-writable directories where the
    directory is, and nothing for others, whatever the umask of the user who writes them."""

    gid: int
    group_read: bool = True
    group_write: bool = False

    def dir_mode(self) -> int:
        """``drwxr-s---`` (``drwxrws---`` where members may write): setgid, so the group is inherited."""
        return 0o2700 | (0o050 if self.group_read else 0o010) | (0o020 if self.group_write else 0)

    def file_mode(self, mode: int) -> int:
        """``mode``'s owner bits; the group may read (and run what the owner may run); others nothing.
        Files are never group-writable: they are replaced by a rename, which needs the directory only."""
        owner = mode & 0o700
        return owner | (((owner & 0o500) >> 3) if self.group_read else 0)

    def own(self, path: Path) -> None:
        """Give ``path`` (ours) the group: the setgid directory normally did; a copy moved in did not."""
        with contextlib.suppress(OSError):
            if os.lstat(path).st_gid != self.gid:
                os.chown(path, -1, self.gid, follow_symlinks=False)

    def publish_dir(self, path: Path) -> None:
        """Open a directory of ours to the group: setgid, the group's bits added (write only where members
        may write), others' write removed. Nothing else is taken away."""
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
                return
            self.own(path)
            mode = stat.S_IMODE(st.st_mode)
            wanted = (mode | (self.dir_mode() & 0o2070)) & ~0o002
            if mode != wanted:
                os.chmod(path, wanted)

    def publish_file(self, path: Path) -> None:
        """Give a file of ours the group's mode (:meth:`file_mode` of its owner bits)."""
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                return
            self.own(path)
            wanted = self.file_mode(stat.S_IMODE(st.st_mode))
            if stat.S_IMODE(st.st_mode) != wanted:
                os.chmod(path, wanted)


def existing_ancestor(path: Path) -> Path:
    """``path`` when it exists, else its nearest ancestor that does."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def share_for(path: Path) -> Share | None:
    """The :class:`Share` of the group directory ``path`` is (or will be created) in: its nearest existing
    directory when that is setgid (its group; members write where a group tree says so, or else where that
    directory lets them); None elsewhere (a home directory: files follow the umask, as before)."""
    top = existing_ancestor(path)
    try:
        st = os.stat(top)
    except OSError:
        return None
    if not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISGID):
        return None
    from hpc_kernels import group

    tree = group.find_tree(top)
    members_write = tree.members_write if tree is not None else bool(st.st_mode & 0o020)
    return Share(st.st_gid, True, members_write)


def make_dirs(path: Path, share: Share | None = None) -> Path:
    """``mkdir -p path``. In a group directory (``share``) every directory created gets the group's mode
    whatever the umask, and existing directories of ours on the way, inside a setgid directory, are opened
    to the group (:meth:`Share.publish_dir`): what is published there must be reachable by the group."""
    if share is None:
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(os.path.abspath(path))
    for directory in [*reversed(path.parents), path]:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if _in_group_dir(directory):
                share.publish_dir(directory)
            continue
        except OSError:
            if os.path.isdir(directory):  # EACCES on an ancestor that exists: nothing to create
                continue
            raise
        share.own(directory)
        with contextlib.suppress(OSError):  # exactly, whatever the umask took away
            os.chmod(directory, share.dir_mode())
    return path


def _in_group_dir(directory: Path) -> bool:
    """True when ``directory`` is ours and its parent is a setgid directory (a group tree)."""
    try:
        return (os.stat(directory).st_uid == os.getuid()
                and bool(os.stat(directory.parent).st_mode & stat.S_ISGID) and directory != directory.parent)
    except OSError:
        return False


def atomic_write(path: Path, text: str, mode: int = 0o644, private: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    ``private``: per-user state, the directory 0700 (see :func:`private_dir`) and the file 0600.
    In a group directory (:func:`share_for`) the file gets the group's modes instead (:class:`Share`).
    """
    share = None
    if private:
        private_dir(path.parent)
        mode = PRIVATE_FILE
    else:
        share = share_for(path.parent)
        make_dirs(path.parent, share)
        if share is not None:
            mode = share.file_mode(mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if share is not None:
            share.own(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """``os.open`` of a per-user state file: created 0600, and an older 0644 file of ours tightened."""
    fd = os.open(path, flags, PRIVATE_FILE)
    _tighten_fd(fd)
    return fd


def _tighten_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)


# ----------------------------------------------------------------------------- locks


@dataclass(frozen=True)
class LockHolder:
    """The process that holds a ``flock``, as ``/proc/locks`` names it (uid None: not visible to us)."""

    pid: int
    uid: int | None

    def describe(self) -> str:
        """``pid 123 of user bob`` (or of uid N, or without a user when /proc hides it)."""
        if self.uid is None:
            return f"pid {self.pid}"
        import pwd

        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = f"uid {self.uid}"
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
                _tighten_fd(fd)
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


def remove_tree(path: Path) -> None:
    """``shutil.rmtree(path)`` whose errors name the full path of the file that could not be removed.

    The standard rmtree works through directory descriptors and reports a bare file name
    (``Permission denied: 'kernel.json'``), which does not tell the user which directory to fix.
    """
    import shutil
    import sys

    def full_path(_func: object, where: str, error: object) -> None:
        exc = error[1] if isinstance(error, tuple) else error
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, where) from exc
        raise exc if isinstance(exc, BaseException) else OSError(f"cannot remove {where}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=full_path)
    else:
        shutil.rmtree(path, onerror=full_path)


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


# ----------------------------------------------------------------------------- locks across nodes and users

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
        import json

        return json.dumps({"generator": "hpc-kernels", "host": self.host, "pid": self.pid, "start": self.start,
                           "boot": self.boot, "uid": self.uid, "user": self.user, "since": self.since,
                           "token": self.token}) + "\n"

    @classmethod
    def read(cls, path: Path) -> LockRecord | None:
        """The record in ``path``; None when it is gone, unreadable or not (yet) a whole record."""
        import json

        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                data = json.loads(fh.read(4096))
            start = data.get("start")
            return cls(str(data["host"]), int(data["pid"]), int(start) if isinstance(start, int) else None,
                       str(data.get("boot", "")), int(data["uid"]), str(data.get("user", data["uid"])),
                       float(data["since"]), str(data["token"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def boot_id() -> str:
    """This boot's id ("" where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of the live (non-zombie) process ``pid`` (clock ticks since boot); None when it is gone
    or hidden (:mod:`hpc_kernels.procfs`)."""
    from hpc_kernels import procfs

    ref = procfs.proc_ref(pid)
    return ref.start if ref is not None else None


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _holder_alive(record: LockRecord) -> bool:
    """For a record of this host: does its process still run (the same process, in this boot)?"""
    if record.boot and boot_id() and record.boot != boot_id():
        return False
    start = process_start(record.pid)
    if start is None:
        try:  # /proc may hide other users' processes (hidepid): the kernel still knows
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return record.start is None or start == record.start


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
    import secrets
    import threading

    from hpc_kernels import paths

    host = paths.hostname()
    token = secrets.token_hex(8)
    record = LockRecord(host, os.getpid(), process_start(os.getpid()), boot_id(), os.getuid(),
                        _user_name(os.getuid()), time.time(), token)
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
    import errno

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
    from hpc_kernels import paths

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
    from hpc_kernels import paths

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
