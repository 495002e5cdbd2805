"""Atomic file writes and advisory locks: no half-written file, ever."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
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


@contextlib.contextmanager
def locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False (not held) when busy and not blocking.

    Survives the lock file being removed and recreated meanwhile (gc removes state directories):
    after locking, the path must still name the file we locked, else we lock the new one, so two
    processes never both think they hold the lock. The holder's pid is written into the file.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed between mkdir and open: again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
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
