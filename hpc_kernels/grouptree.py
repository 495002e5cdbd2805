"""The marker of a group tree (``.hpc-kernels-group.json``) and the tree it names: found from any path inside.

Low in the layers (files, locks and group modes ask "is this path in a group tree?"); ``group init``, refusing
members who may not write and publishing are :mod:`hpc_kernels.group`'s.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import __version__, access

MARKER = ".hpc-kernels-group.json"
#: User and module names as the marker may hold them (no white space, quotes or control characters).
_PLAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]*$")
FORMAT = 1
DEFAULT_MODULE = "container-kernels"


@dataclass(frozen=True)
class GroupTree:
    """A group tree: where it is, its group, who maintains it, and whether members may write."""

    root: Path
    group: str
    gid: int
    members_write: bool
    maintainer: str
    module_name: str = DEFAULT_MODULE
    created_at: float = 0.0

    @property
    def registry(self) -> Path:
        """The group's ``kernels.yaml``."""
        return self.root / "kernels.yaml"

    @property
    def prefix(self) -> Path:
        """The Jupyter prefix of the group's kernelspecs (``share/jupyter/kernels`` under it)."""
        return self.root

    @property
    def modulefiles(self) -> Path:
        """The modulefile tree members ``module use``."""
        return self.root / "modulefiles"

    @property
    def mode(self) -> int:
        """The mode of the tree's directories."""
        return 0o2770 if self.members_write else 0o2750

    def to_json(self) -> dict[str, Any]:
        """The marker's content (and ``group init --json``)."""
        return {"generator": "hpc-kernels", "format": FORMAT, "root": str(self.root), "group": self.group,
                "members": "write" if self.members_write else "read", "maintainer": self.maintainer,
                "module": self.module_name, "created_at": self.created_at, "version": __version__}



def find_tree(path: Path) -> GroupTree | None:
    """The group tree ``path`` lies in (the nearest directory up from it with the marker), or None."""
    here = Path(os.path.abspath(path))
    for directory in [here, *here.parents]:
        marker = directory / MARKER
        if os.path.isfile(marker):
            return _read_marker(directory)
        if os.path.lexists(marker):  # there, but this user may not read it: still that tree
            return _from_stat(directory)
    return None



def _read_marker(root: Path) -> GroupTree:
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("generator") != "hpc-kernels":
            raise ValueError("not ours")
        st = os.stat(root)
        maintainer = str(data.get("maintainer") or access.user_name(st.st_uid))
        module = str(data.get("module") or DEFAULT_MODULE)
        # Printed in messages and written into modulefiles: plain names only, else what the directory says.
        if not (_PLAIN_RE.match(maintainer) and _PLAIN_RE.match(module)):
            raise ValueError("not plain names")
        return GroupTree(root, access.group_name(st.st_gid), st.st_gid, data.get("members") == "write",
                         maintainer, module, float(data.get("created_at") or 0.0))
    except (OSError, ValueError, TypeError):
        return _from_stat(root)



def _from_stat(root: Path) -> GroupTree:
    """A tree whose marker cannot be read: what its directory says."""
    try:
        st = os.stat(root)
    except OSError:
        return GroupTree(root, "?", -1, False, "its owner")
    return GroupTree(root, access.group_name(st.st_gid), st.st_gid, bool(st.st_mode & 0o020),
                     access.user_name(st.st_uid))



def tree_of_registry(registry: Path | None) -> GroupTree | None:
    """The group tree whose registry ``registry`` is (a registry file inside a tree), or None."""
    if registry is None:
        return None
    return find_tree(registry.parent)


def entries(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every directory and file under ``root`` with its ``lstat``, top-down; symbolic links (never followed:
    they may point out of the tree) and entries that vanish meanwhile are left out."""
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                yield path, st

