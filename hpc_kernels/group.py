"""Group trees: one member of a research group builds and publishes, every member uses.

A group tree is a directory in the group's ``/project`` (``hpc-kernels group init DIR``) holding::

    .hpc-kernels-group.json    this file's marker: the group, who maintains it, whether members may write
    kernels.yaml               the group's registry (images_dir: images)
    defs/                      recipes
    images/                    the images (replaced atomically by builds: running kernels keep the old one)
    share/jupyter/kernels/     the kernelspecs ('install' with the group's registry writes here)
    bin/, modulefiles/         the wrapper and the module ('module load container-kernels')

Everything hpc-kernels writes in it is owned by the tree's group, readable by the group and by nobody
else, whatever the writer's umask (:class:`hpc_kernels.fsutil.Share`, applied to any setgid directory).
Directories are ``drwxr-s---`` (members read) or ``drwxrws---`` (members write too); a member who may not
write is refused before anything changes, with who can (:func:`ensure_writable`).
"""

from __future__ import annotations

import grp
import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpc_kernels
from hpc_kernels import access, fsutil, grouptree
from hpc_kernels.errors import HpcKernelsError, NoWriteAccessError, UsageError
from hpc_kernels.grouptree import _PLAIN_RE, DEFAULT_MODULE, MARKER, GroupTree, find_tree

MEMBERS = ("read", "write")
#: What ``group init`` creates inside the tree (the kernelspec and module directories are made by
#: ``install`` and ``module install`` too; creating them now gives them the tree's mode from the start).
SUBDIRS = ("defs", "images", "share/jupyter/kernels", "modulefiles")

REGISTRY_TEMPLATE = """\
# The registry of the group {group}'s kernels (written by 'hpc-kernels group init'). Recipes go in defs/,
# images are built into images/; 'hpc-kernels install' with this registry publishes the kernelspecs and the
# module in this tree for every member of {group}.
defaults:
  images_dir: images
kernels: {{}}
# kernels:
#   science:
#     def: defs/science.def
#     display_name: Python 3.12 (science)
"""


# ----------------------------------------------------------------------------- refusing members


def ensure_writable(path: Path, doing: str, hint: str = "") -> None:
    """Raise :class:`NoWriteAccessError` (nothing written yet) when this user cannot create or replace
    files in ``path`` (or the nearest directory of it that exists): one sentence saying who can."""
    top = fsutil.existing_ancestor(path)
    if not os.path.isdir(top):
        return  # a file where a directory should be: the write itself reports it
    if os.access(top, os.W_OK | os.X_OK):
        return
    me = access.user_name(os.getuid())
    who = access.who_can_write(top)
    tree = find_tree(top)
    hint = f"; {hint}" if hint else ""
    if tree is None:
        raise NoWriteAccessError(f"you ({me}) cannot {doing}: in {top} {who} can write; nothing was changed{hint}.")
    raise NoWriteAccessError(
        f"you ({me}) cannot {doing}: it is the group {tree.group}'s install in {tree.root}, where {who} can "
        f"write; nothing was changed: ask {tree.maintainer}{hint}, or layer a registry of yours over the "
        f"group's ('extends: {tree.registry}' in it; see docs/groups.md).")


def explain_unreadable(path: Path, want: int = os.R_OK) -> str | None:
    """:func:`hpc_kernels.access.explain` with the repair command of the group tree ``path`` is in."""
    tree = find_tree(path)
    repair = f"'hpc-kernels group init {tree.root}' repairs the modes of the tree" if tree else ""
    return access.explain(path, want, repair=repair)


# ----------------------------------------------------------------------------- publishing


def publish_inputs(paths: list[Path]) -> None:
    """Give the group read access to files of ours in a group tree that members' commands read (the
    registry, recipes, ``%files`` sources): a maintainer's editor with umask 077 writes them 0600."""
    for path in paths:
        share = fsutil.share_for(path.parent)
        if share is None or find_tree(path) is None:
            continue
        if path.is_dir():
            for directory, _dirs, files in os.walk(path):
                share.publish_dir(Path(directory))
                for name in files:
                    share.publish_file(Path(directory) / name)
        else:
            share.publish_file(path)


# ----------------------------------------------------------------------------- group init


@dataclass(frozen=True)
class InitResult:
    """What ``group init`` did."""

    tree: GroupTree
    created: tuple[Path, ...]
    repaired: tuple[Path, ...]
    others: tuple[Path, ...]  # entries of other users whose modes were left alone
    warnings: tuple[str, ...] = field(default=())


def init(root: Path, group: str | None = None, members: str | None = None,
         module_name: str | None = None) -> InitResult:
    """Create the group tree ``root`` (or repair an existing one): directories and files of ours get the
    tree's group and modes, a starter registry is written when there is none."""
    root = Path(os.path.abspath(root))
    parent = root.parent
    if not parent.is_dir():
        raise HpcKernelsError(f"{parent} does not exist: create the group directory first (on DRAC it is "
                              "/project/def-PI, made by the cluster), then run 'hpc-kernels group init' on a "
                              "directory inside it.")
    previous = find_tree(root) if (root / MARKER).exists() else None
    if members is not None and members not in MEMBERS:
        raise UsageError(f"--members must be one of {', '.join(MEMBERS)}, not {members!r}.")
    if module_name is not None and not _PLAIN_RE.match(module_name):
        raise UsageError(f"--module-name {module_name!r} must be letters, digits, '.', '_', '+' or '-'.")
    members_write = (members == "write") if members is not None else bool(previous and previous.members_write)
    gid = _choose_group(root, group)
    gname = access.group_name(gid)
    if not access.in_group(gid):
        raise HpcKernelsError(f"you are not in the group {gname}: a group tree is for a group you belong to "
                              "(see 'id'); pass --group GROUP with one of yours.")
    if os.path.lexists(root):
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise HpcKernelsError(f"{root} exists and is not a directory.")
        if st.st_uid != os.getuid():
            raise HpcKernelsError(f"{root} belongs to {access.user_name(st.st_uid)}: a group tree is maintained by "
                                  f"the user who owns it; choose a directory of your own (e.g. {root / 'kernels'}).")
    else:
        ensure_writable(parent, f"create {root}")
    me = access.user_name(os.getuid())
    tree = GroupTree(root, gname, gid, members_write,
                     previous.maintainer if previous and previous.maintainer != "its owner" else me,
                     module_name or (previous.module_name if previous else DEFAULT_MODULE),
                     previous.created_at if previous and previous.created_at else time.time())
    share = fsutil.Share(gid, group_read=True, group_write=members_write)
    created: list[Path] = []
    if not root.exists():
        os.mkdir(root, 0o700)
        created.append(root)
    os.chown(root, -1, gid)
    os.chmod(root, tree.mode)  # exactly: also takes group write away with --members read
    for sub in SUBDIRS:
        path = root / sub
        if not path.exists():
            created.append(path)
        fsutil.make_dirs(path, share)
    marker_text = json.dumps(tree.to_json(), indent=1) + "\n"
    fsutil.atomic_write(root / MARKER, marker_text, 0o644)
    if not tree.registry.exists():
        fsutil.atomic_write(tree.registry, REGISTRY_TEMPLATE.format(group=gname), 0o644)
        created.append(tree.registry)
    repaired, others = _repair(root, share)
    return InitResult(tree, tuple(created), tuple(p for p in repaired if p not in created), tuple(others),
                      tuple(_program_warnings(tree)))


def _choose_group(root: Path, group: str | None) -> int:
    if group:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise HpcKernelsError(f"there is no group named {group!r} (see 'id' for yours).") from None
    for directory in (root, root.parent):
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if st.st_mode & stat.S_ISGID:
            return st.st_gid
    raise HpcKernelsError(f"{root.parent} is not a group directory (no setgid bit, as /project/def-PI has): "
                          "pass --group GROUP to say which group the tree is for.")


def _repair(root: Path, share: Any) -> tuple[list[Path], list[Path]]:
    """Give every directory and file of ours under ``root`` the tree's group and modes (exactly: members'
    write follows the tree). Entries of other users are listed, not changed (only their owner can)."""
    repaired: list[Path] = []
    others: list[Path] = []
    uid = os.getuid()
    for path, st in grouptree.entries(root):
        if st.st_uid != uid:
            others.append(path)
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            wanted = (mode & 0o700) | 0o700 | share.dir_mode()
        elif stat.S_ISREG(st.st_mode):
            wanted = share.file_mode(mode)
        else:
            continue
        if mode != wanted or st.st_gid != share.gid:
            share.own(path)
            os.chmod(path, wanted)
            repaired.append(path)
    return repaired, others


def _program_warnings(tree: GroupTree) -> list[str]:
    """Kernelspecs run this Python and this package: members must be able to reach both."""
    warnings = []
    for what, path in (("the Python that runs hpc-kernels", Path(sys.executable)),
                       ("the hpc_kernels package", Path(hpc_kernels.__file__).parent)):
        closed = _closed_to_group(path, tree.gid)
        if closed is not None:
            warnings.append(
                f"members of {tree.group} cannot reach {what} ({path}): {closed} is "
                f"{stat.filemode(os.stat(closed).st_mode)}, so kernelspecs and the module you publish would not "
                f"start for them. Install hpc-kernels inside the tree and run it from there: python3 -m venv "
                f"{tree.root / 'venv'} && {tree.root / 'venv/bin/pip'} install /path/to/a/clone/of/hpc-kernels, "
                f"then run 'hpc-kernels group init {tree.root}' again (it gives the venv the tree's modes).")
    return warnings


def _closed_to_group(path: Path, gid: int) -> Path | None:
    """The first directory on the way to ``path`` (or ``path``) that members of ``gid`` cannot use."""
    path = Path(os.path.abspath(path))
    for item in [*reversed(path.parents), path]:
        try:
            st = os.stat(item)
        except OSError:
            return item
        need = 0o1 if stat.S_ISDIR(st.st_mode) else 0o4
        other = st.st_mode & need
        group = st.st_gid == gid and st.st_mode & (need << 3)
        if not (other or group):
            return item
    return None
