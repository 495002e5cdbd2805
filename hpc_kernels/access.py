"""Why this user cannot read (or write) a path, in one sentence: which directory on the way stops them,
its owner, group and mode, whether they are in that group (or were added after logging in), and ACLs.

``doctor`` and the refusals of shared installs use it: "Permission denied" alone does not tell a member
of a research group whom to ask, or what to ask for.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

#: The extended attribute that holds a POSIX access ACL (``setfacl``/``getfacl``).
ACL_XATTR = "system.posix_acl_access"


def user_name(uid: int) -> str:
    """The login name of ``uid`` (``uid N`` when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    """The name of group ``gid`` (``gid N`` when it has none)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def in_group(gid: int) -> bool:
    """True when this process has ``gid`` (its group or one of its supplementary groups)."""
    return gid == os.getegid() or gid in os.getgroups()


def listed_in_group(gid: int, user: str | None = None) -> bool:
    """True when the group database lists the user in ``gid`` (membership a new login would give)."""
    user = user or user_name(os.getuid())
    try:
        if user in grp.getgrgid(gid).gr_mem:
            return True
        return pwd.getpwnam(user).pw_gid == gid
    except KeyError:
        return False


def has_acl(path: Path) -> bool:
    """True when ``path`` carries a POSIX access ACL (its mode bits then do not tell the whole story)."""
    try:
        os.getxattr(path, ACL_XATTR, follow_symlinks=True)
    except (OSError, AttributeError):
        return False
    return True


def describe(path: Path, st: os.stat_result) -> str:
    """``/p/x (drwxr-s---, owner bob, group def-pi)`` (``, with an ACL`` when it has one)."""
    acl = ", with an ACL" if has_acl(path) else ""
    return f"{path} ({stat.filemode(st.st_mode)}, owner {user_name(st.st_uid)}, group {group_name(st.st_gid)}{acl})"


@dataclass(frozen=True)
class Blocker:
    """The first path on the way to a file that this user may not use as needed."""

    path: Path
    action: str  # "enter" (a directory on the way), "read" or "write"
    st: os.stat_result


def blocker(path: Path, want: int = os.R_OK) -> Blocker | None:
    """What stops this user from ``want`` (``os.R_OK``/``os.W_OK``) on ``path``: a directory on the way they
    cannot enter, or ``path`` itself. None when nothing does (or ``path`` does not exist)."""
    path = Path(os.path.abspath(path))
    for directory in reversed(path.parents):
        try:
            st = os.stat(directory)
        except OSError:
            return None
        if not os.access(directory, os.X_OK):
            return Blocker(directory, "enter", st)
    try:
        st = os.stat(path)
    except OSError:
        return None
    need = want | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
    if not os.access(path, need):
        action = "write" if want & os.W_OK else "run" if want & os.X_OK and not stat.S_ISDIR(st.st_mode) else "read"
        return Blocker(path, action, st)
    return None


def explain(path: Path, want: int = os.R_OK, *, repair: str = "") -> str | None:
    """Why this user cannot ``want`` ``path``, with what would fix it; None when they can.

    ``repair``: the command that gives the group its access back (``hpc-kernels group init ROOT``).
    """
    found = blocker(path, want)
    if found is None:
        return None
    me = user_name(os.getuid())
    st = found.st
    what = describe(found.path, st)
    group = group_name(st.st_gid)
    owner = user_name(st.st_uid)
    bits = {"enter": 0o010, "read": 0o040, "write": 0o020, "run": 0o010}[found.action]
    if found.action in ("enter", "read") and stat.S_ISDIR(st.st_mode):
        bits |= 0o010
    head = f"you ({me}) cannot {found.action} {what}"
    if st.st_uid == os.getuid():
        why = "it is yours, but its mode does not allow that"
        fix = f"chmod u+{'w' if found.action == 'write' else 'rX'} {found.path}"
    elif st.st_mode & bits == bits:  # the group may: is this user in it?
        if in_group(st.st_gid):
            why = ("its mode lets the group in, so an ACL must refuse you" if has_acl(found.path)
                   else "the system refuses although its mode lets your group in")
            fix = f"ask {owner} to check 'getfacl {found.path}'"
        elif listed_in_group(st.st_gid, me):
            why = f"you were added to the group {group} after this session started"
            fix = f"log out and in again (a new JupyterHub session too), or run 'newgrp {group}'"
        else:
            why = f"you are not in the group {group}"
            fix = (f"ask {owner} or your PI to add you to {group} (on DRAC the PI adds members in CCDB), then "
                   "log in again")
    else:
        needed = {"enter": "enter", "read": "read", "write": "write", "run": "run"}[found.action]
        why = f"its mode does not let the group {group} {needed} it"
        fix = f"{owner} can fix that: {repair}" if repair else \
            f"{owner} can fix that: chmod g+{'w' if found.action == 'write' else 'rX'} {found.path}"
        if has_acl(found.path):
            why += " (and it has an ACL: 'getfacl' shows it)"
    return f"{head}: {why}; {fix}."


def who_can_write(directory: Path) -> str:
    """Who may create files in ``directory``, in words: ``only alice``, ``alice and the members of def-pi``."""
    try:
        st = os.stat(directory)
    except OSError:
        return "nobody can tell (it cannot be read)"
    owner = user_name(st.st_uid)
    if st.st_mode & 0o002:
        return "everyone"
    who = f"{owner} and the members of {group_name(st.st_gid)}" if st.st_mode & 0o020 else f"only {owner}"
    if has_acl(directory):
        who += f" (and whoever its ACL names: 'getfacl {directory}')"
    return who
