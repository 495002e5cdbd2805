"""Lmod modulefiles that put our kernels in the JupyterHub kernel menu.

``hpc-kernels module install`` writes a small tree::

    <dir>/<name>/<version>.lua      the modulefile (Lua, from templates/container-kernels.lua.tmpl)
    <prefix>/bin/hpc-kernels        a wrapper that runs this environment's hpc-kernels

Loading the module prepends ``<prefix>/share/jupyter`` to ``JUPYTER_PATH`` (where
``hpc-kernels install --prefix <prefix>`` put the kernelspecs), so Jupyter — and jupyter-lmod's
"Software Modules" panel in JupyterLab — finds the kernels. ``PATH`` gets ``<prefix>/bin``, a
directory holding only the wrapper: prepending the venv's own ``bin`` would shadow the user's
``python``/``pip``/``jupyter`` (and relative kernelspec argv like DRAC's ``python``) with ours.

Paths in the modulefile are relative to the modulefile's own location (``myFileName()``) when
they lie under the tree's parent directory (a group directory such as ``/project/def-pi/kernels``
holding ``modulefiles/``, ``share/jupyter``, ``bin``): the module then stays right when that
directory is reached through another path (DRAC's ``/project/def-pi`` is a symlink into Lustre).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import group, specdirs, templates
from hpc_kernels.errors import NotOursError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.modulefile_lua import ModuleConfig, any_relative, render_modulefile, render_wrapper, use_relative

#: How many lines from the top of a file we look at for the generated marker.
_MARKER_LINES = 3


@dataclass(frozen=True)
class PlannedFile:
    """One file ``module install`` writes: where, what, and whether a file is already there."""

    path: Path
    kind: str
    text: str
    mode: int
    exists: bool
    ours: bool

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description (``module show --json``)."""
        return {"path": str(self.path), "kind": self.kind, "mode": oct(self.mode), "exists": self.exists,
                "ours": self.ours, "text": self.text}


@dataclass(frozen=True)
class ModulePlan:
    """Everything ``module install`` would write, and the settings it derived."""

    config: ModuleConfig
    relative: bool
    files: tuple[PlannedFile, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready description (``module show --json``)."""
        cfg = self.config
        return {
            "module": f"{cfg.name}/{cfg.version}",
            "modulefile": str(cfg.modulefile),
            "tree": str(cfg.tree),
            "prefix": str(cfg.prefix),
            "jupyter_path": str(cfg.jupyter_path),
            "bin_dir": str(cfg.bin_dir),
            "program": str(cfg.program),
            "registry": str(cfg.registry) if cfg.registry else None,
            "apptainer_module": cfg.apptainer_module,
            "over_module": cfg.over_module,
            "relative_paths": any_relative(cfg, self.relative),
            "use": f"module use {cfg.tree} && module load {cfg.name}",
            "files": [f.to_json() for f in self.files],
        }


# ----------------------------------------------------------------------------- files


def is_ours(path: Path) -> bool:
    """True when ``path`` is a file whose first lines carry our generated marker."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            head = [fh.readline() for _ in range(_MARKER_LINES)]
    except OSError:
        return False
    return any(templates.GENERATED_MARKER in line for line in head)


def _planned(path: Path, kind: str, text: str, mode: int) -> PlannedFile:
    exists = path.exists() or path.is_symlink()
    return PlannedFile(path, kind, text, mode, exists, exists and not path.is_symlink() and is_ours(path))


def plan(config: ModuleConfig) -> ModulePlan:
    """What ``module install`` would write for ``config`` (nothing is written)."""
    relative = use_relative(config)
    files = (
        _planned(config.modulefile, "modulefile", render_modulefile(config, relative), 0o644),
        _planned(config.wrapper, "wrapper", render_wrapper(config), 0o755),
    )
    return ModulePlan(config, relative, files)


def _refuse_foreign(files: tuple[PlannedFile, ...], verb: str) -> None:
    foreign = [f for f in files if f.exists and not f.ours]
    if foreign:
        listing = ", ".join(str(f.path) for f in foreign)
        raise NotOursError(
            f"refusing to {verb} {listing}: not written by hpc-kernels (no '{templates.GENERATED_MARKER}' "
            "line); move it away, or choose another --dir, --prefix, --name or --module-version."
        )


def write(module_plan: ModulePlan) -> list[Path]:
    """Write every planned file atomically; refuse (before writing anything) to replace a file not ours."""
    for f in module_plan.files:  # a member of a group tree they may not write: refused before anything
        group.ensure_writable(f.path.parent, f"write the {f.kind} {f.path}")
    # Look again now rather than trusting the plan: a file may have appeared since it was made.
    _refuse_foreign(tuple(_planned(f.path, f.kind, f.text, f.mode) for f in module_plan.files), "overwrite")
    for f in module_plan.files:
        atomic_write(f.path, f.text, f.mode)
    return [f.path for f in module_plan.files]


def remove(config: ModuleConfig) -> list[Path]:
    """Remove the modulefile and the wrapper we wrote; refuse files we did not write."""
    files = plan(config).files
    for f in files:
        if f.exists:
            group.ensure_writable(f.path.parent, f"remove the {f.kind} {f.path}")
    _refuse_foreign(files, "remove")
    removed = []
    for f in files:
        if f.exists:
            f.path.unlink()
            removed.append(f.path)
    module_dir = config.modulefile.parent
    if module_dir.is_dir() and not any(module_dir.iterdir()):
        module_dir.rmdir()
    return removed


def our_kernelspecs(config: ModuleConfig) -> list[str]:
    """Names of our kernelspecs under the module's prefix (what loading the module will show)."""
    kdir = config.jupyter_path / "kernels"
    if not kdir.is_dir():
        return []
    return sorted(child.name for child in kdir.iterdir() if specdirs.is_ours(child))
