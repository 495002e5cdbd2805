"""Atomic file writes, private directories and advisory locks: no half-written file, ever, and no
state another user can read or lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
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


def atomic_write(path: Path, text: str, mode: int = 0o644, private: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename.

    ``private``: per-user state, the directory 0700 (see :func:`private_dir`) and the file 0600.
    """
    if private:
        private_dir(path.parent)
        mode = PRIVATE_FILE
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
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
