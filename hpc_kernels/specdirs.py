"""Our kernelspecs as Jupyter finds them: the directories it searches, which are ours (the launch spec in
``metadata.hpc_kernels`` is the marker), half-written ones, which copy of a name wins, and the command that
acts on a given copy.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir, jupyter_path

from hpc_kernels.launchspec import MARKER

#: Package data copied into every kernelspec: Jupyter serves them as /kernelspecs/<name>/<file>, and
#: JupyterLab's launcher shows logo-svg.svg on our kernels' cards (logo-64x64.png for older frontends).
LOGO_FILES = ("logo-svg.svg", "logo-64x64.png")


@dataclass(frozen=True)
class Target:
    """Where to install: the user's Jupyter data dir, a ``--prefix``, or ``sys.prefix``."""

    user: bool = True
    prefix: str | None = None

    @classmethod
    def from_flags(cls, prefix: str | None, sys_prefix: bool) -> Target:
        """Map the CLI's ``--prefix``/``--sys-prefix`` onto a target."""
        if prefix:
            return cls(user=False, prefix=str(Path(prefix).expanduser().absolute()))
        if sys_prefix:
            return cls(user=False, prefix=sys.prefix)
        return cls(user=True)

    def kernels_dir(self) -> Path:
        """The ``kernels`` directory jupyter_client installs into for this target."""
        if self.prefix:
            return Path(self.prefix) / "share" / "jupyter" / "kernels"

        return Path(jupyter_data_dir()) / "kernels"


#: Our temporaries beside the kernelspecs: a directory being written (renamed into place when complete),
#: and one being replaced or removed. Named ``PREFIX<kernel>@<host>.<pid>.<random>``.
STAGING_PREFIX = ".hpck-staging-"
RETIRED_PREFIX = ".hpck-old-"
#: A temporary whose process cannot be checked (another node wrote it) is a leftover after this long.
LEFTOVER_AGE = 600.0


def is_ours(kernel_dir: Path) -> bool:
    """True when ``kernel_dir/kernel.json`` was written by hpc-kernels (and is not one of our temporaries)."""
    if kernel_dir.name.startswith((STAGING_PREFIX, RETIRED_PREFIX)):
        return False
    try:
        data = json.loads((kernel_dir / "kernel.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    meta = data.get("metadata") if isinstance(data, dict) else None
    return isinstance(meta, dict) and isinstance(meta.get(MARKER), dict)


def half_written(kernel_dir: Path) -> bool:
    """True for a kernelspec directory an interrupted install of ours left behind.

    Earlier versions copied files into place (jupyter_client's ``install_kernel_spec``), and a full disk
    left a 0-byte kernel.json that nothing recognised as ours any more. Such a directory holds only our
    file names, logos that are (a start of) our own, and a kernel.json that is empty or cut-off
    JSON naming hpc_kernels: there is nothing of the user's in it to lose.
    """
    if is_ours(kernel_dir) or not os.path.isdir(kernel_dir) or kernel_dir.is_symlink():
        return False

    try:
        names = {p.name for p in kernel_dir.iterdir()}
        if not names <= {"kernel.json", *LOGO_FILES}:
            return False
        resources = files("hpc_kernels").joinpath("resources")
        for logo in names & set(LOGO_FILES):
            if not resources.joinpath(logo).read_bytes().startswith((kernel_dir / logo).read_bytes()):
                return False
        text = (kernel_dir / "kernel.json").read_bytes()  # a copy that failed still created it
    except OSError:
        return False
    if not text.strip():
        return True
    try:
        json.loads(text)
    except ValueError:
        return MARKER.encode() in text
    return False  # complete JSON that is not ours: someone else's


def search_dirs() -> list[Path]:
    """The ``kernels`` directories Jupyter searches, in its order (JUPYTER_PATH first)."""
    return [Path(p) for p in jupyter_path("kernels")]


def unique_search_dirs() -> list[Path]:
    """:func:`search_dirs` with each directory once (JUPYTER_PATH may repeat one, or name it by a symlink)."""
    seen: set[str] = set()
    out: list[Path] = []
    for kdir in search_dirs():
        key = os.path.realpath(kdir)
        if key not in seen:
            seen.add(key)
            out.append(kdir)
    return out


def installed_ours_all() -> dict[str, list[Path]]:
    """Our kernelspecs visible to Jupyter: name → its directories in search order.

    Jupyter uses the first; the others are hidden by it (``list`` and ``doctor`` name them).
    """
    found: dict[str, list[Path]] = {}
    for kdir in unique_search_dirs():
        try:
            children = sorted(kdir.iterdir())
        except OSError:  # missing, or a directory this user cannot read
            continue
        for child in children:
            if is_ours(child):
                found.setdefault(child.name, []).append(child)
    return found


def installed_ours() -> dict[str, Path]:
    """Our kernelspecs visible to Jupyter: name → directory (the first one Jupyter would use)."""
    return {name: dirs[0] for name, dirs in installed_ours_all().items()}


def copies(name: str) -> list[Path]:
    """Every kernelspec directory named ``name`` that Jupyter can see (ours or not), the one it uses first."""
    return [kdir / name for kdir in unique_search_dirs() if os.path.isfile(kdir / name / "kernel.json")]


def unreadable(name: str) -> list[Path]:
    """Kernelspec directories named ``name`` on Jupyter's search path that this user cannot read (so
    Jupyter does not list them): a group's kernelspec written with a restrictive umask, say."""
    found = []
    for kdir in unique_search_dirs():
        spec = kdir / name
        if os.path.lexists(spec) and not os.path.isfile(spec / "kernel.json") and (
                not os.access(spec, os.R_OK | os.X_OK) or os.path.lexists(spec / "kernel.json")):
            found.append(spec)
    return found


@dataclass(frozen=True)
class Placement:
    """Where a kernelspec in a target directory stands among the copies of the same name Jupyter sees."""

    on_path: bool  # Jupyter searches the target's kernels directory at all
    ahead: tuple[Path, ...]  # copies Jupyter finds first: a copy in the target would be hidden
    behind: tuple[Path, ...]  # copies a copy in the target hides


def placements(names: Iterable[str], target: Target) -> dict[str, Placement]:
    """How a kernelspec of each name installed into ``target`` would relate to the other copies Jupyter sees."""
    wanted = os.path.realpath(target.kernels_dir())
    # The search path once for all names: `install --all` of 500 kernels stays a few milliseconds.
    dirs = [(kdir, os.path.realpath(kdir) == wanted) for kdir in unique_search_dirs()]
    found: dict[str, Placement] = {}
    for name in names:
        on_path = False
        ahead: list[Path] = []
        behind: list[Path] = []
        for kdir, is_target in dirs:
            if is_target:
                on_path = True
            elif os.path.isfile(kdir / name / "kernel.json"):
                (behind if on_path else ahead).append(kdir / name)
        found[name] = Placement(on_path, tuple(ahead), tuple(behind))
    return found


def target_flags(spec_dir: Path) -> list[str] | None:
    """The ``install``/``uninstall`` flags that reach the kernelspec directory ``spec_dir`` (None: none do)."""
    kdir = os.path.realpath(spec_dir.parent)
    if kdir == os.path.realpath(Target().kernels_dir()):
        return ["--user"]
    if kdir == os.path.realpath(Target(user=False, prefix=sys.prefix).kernels_dir()):
        return ["--sys-prefix"]
    parent = spec_dir.parent
    if parent.name == "kernels" and parent.parent.name == "jupyter" and parent.parent.parent.name == "share":
        return ["--prefix", str(parent.parent.parent.parent)]
    return None


def command(verb: str, name: str, spec_dir: Path) -> str | None:
    """``hpc-kernels VERB NAME <flags>`` acting on the copy in ``spec_dir``, quoted for a shell (None: none can)."""
    flags = target_flags(spec_dir)
    return None if flags is None else shlex.join(["hpc-kernels", verb, name, *flags])


def visible(name: str) -> Path | None:
    """The kernelspec directory Jupyter would use for ``name`` (ours or not)."""
    for kdir in search_dirs():
        if os.path.isfile(kdir / name / "kernel.json"):
            return kdir / name
    return None
