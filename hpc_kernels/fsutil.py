"""Atomic file writes, private directories and group directories: no half-written file, ever, no state
another user can read, and what is published in a group directory readable by its group (locks:
:mod:`hpc_kernels.locks`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    from hpc_kernels.grouptree import find_tree  # why: kernel starts write state with fsutil; trees are rare

    tree = find_tree(top)
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
    tighten_fd(fd)
    return fd


def tighten_fd(fd: int) -> None:
    """Take group and others' bits off the file of ours open at ``fd`` (per-user state)."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)


def remove_tree(path: Path) -> None:
    """``shutil.rmtree(path)`` whose errors name the full path of the file that could not be removed.

    The standard rmtree works through directory descriptors and reports a bare file name
    (``Permission denied: 'kernel.json'``), which does not tell the user which directory to fix.
    """
    def full_path(_func: object, where: str, error: object) -> None:
        exc = error[1] if isinstance(error, tuple) else error
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, where) from exc
        raise exc if isinstance(exc, BaseException) else OSError(f"cannot remove {where}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=full_path)
    else:
        shutil.rmtree(path, onerror=full_path)
