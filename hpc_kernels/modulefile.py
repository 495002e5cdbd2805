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

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import __version__, paths, templates
from hpc_kernels.errors import HpcKernelsError, NotOursError, UsageError
from hpc_kernels.fsutil import atomic_write

DEFAULT_NAME = "container-kernels"
#: The default name of a member's own module over the group's (which is ``container-kernels``).
LAYERED_NAME = "my-kernels"
DEFAULT_APPTAINER_MODULE = "apptainer"
PATH_STYLES = ("auto", "relative", "absolute")
TEMPLATE = "container-kernels.lua.tmpl"
WRAPPER_TEMPLATE = "hpc-kernels-wrapper.sh.tmpl"

#: Module names and versions become path components and Lua strings: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Lmod module names may have one slash (``apptainer/1.4``).
_MODULE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9._+-]+)?$")
_ALLOWED = "letters, digits, '.', '_', '+' or '-' (starting with a letter or digit)"
#: How many lines from the top of a file we look at for the generated marker.
_MARKER_LINES = 3


def default_tree() -> Path:
    """``~/modulefiles``: where ``module install`` writes when no ``--dir`` is given."""
    return Path.home() / "modulefiles"


def default_prefix() -> Path:
    """``<data dir>/prefix``: the module's Jupyter prefix when no ``--prefix`` is given."""
    return paths.data_dir() / "prefix"


def current_program() -> Path:
    """The ``hpc-kernels`` console script of the running environment (venv ``bin``, next to python)."""
    beside = Path(sys.executable).parent / "hpc-kernels"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("hpc-kernels")
    if found:
        return Path(found).absolute()
    raise HpcKernelsError(
        f"cannot find the 'hpc-kernels' program next to {sys.executable} or on PATH; "
        "install hpc-kernels into this environment (pip install /path/to/a/clone/of/hpc-kernels) and run it "
        "from there."
    )


@dataclass(frozen=True)
class ModuleConfig:
    """What ``module install`` was asked to write (absolute, unresolved paths)."""

    tree: Path
    prefix: Path
    program: Path
    registry: Path | None = None
    name: str = DEFAULT_NAME
    version: str = __version__
    apptainer_module: str | None = DEFAULT_APPTAINER_MODULE
    path_style: str = "auto"
    #: A member's own module over their group's (their registry ``extends`` the group's): the group's
    #: module, loaded first (``depends_on``), and the modulefile tree it lives in.
    over_module: str | None = None
    over_tree: Path | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise UsageError(f"module name '{self.name}' must be {_ALLOWED}.")
        if not _NAME_RE.match(self.version):
            raise UsageError(f"module version '{self.version}' must be {_ALLOWED}.")
        if self.apptainer_module is not None and not _MODULE_RE.match(self.apptainer_module):
            raise UsageError(
                f"'{self.apptainer_module}' is not a module name (like 'apptainer' or 'apptainer/1.4').")
        if self.path_style not in PATH_STYLES:
            raise UsageError(f"path style must be one of {', '.join(PATH_STYLES)}, not '{self.path_style}'.")
        # Lmod writes these paths into the shell code it hands `module load`: a line break there
        # breaks that code (PATH replaced); ':' would split one PATH entry into two.
        if self.over_module is not None and not _MODULE_RE.match(self.over_module):
            raise UsageError(f"the group's module name '{self.over_module}' is not a module name.")
        if self.over_module is not None and self.over_module == self.name:
            raise UsageError(f"your module would have the name of your group's, '{self.name}', and Lmod loads only "
                             "one module of a name: give yours another with --name (e.g. --name my-kernels).")
        named = {"--dir": self.tree, "--prefix": self.prefix, "the hpc-kernels program": self.program,
                 "--registry": self.registry, "the group's module tree": self.over_tree}
        for what, path in named.items():
            found = None if path is None else templates.control_character(str(path))
            if found is not None:
                raise UsageError(f"the path of {what} {str(path)!r} contains a line break or control character "
                                 f"({found}), which a modulefile cannot carry safely; choose a path without it.")
        if ":" in str(self.prefix):
            raise UsageError(f"the --prefix {self.prefix} contains ':', which separates the entries of PATH and "
                             "JUPYTER_PATH; choose a path without it.")

    @property
    def modulefile(self) -> Path:
        """``<tree>/<name>/<version>.lua``."""
        return self.tree / self.name / f"{self.version}.lua"

    @property
    def jupyter_path(self) -> Path:
        """The directory the module prepends to ``JUPYTER_PATH``."""
        return self.prefix / "share" / "jupyter"

    @property
    def bin_dir(self) -> Path:
        """The directory the module prepends to ``PATH`` (holds only our wrapper)."""
        return self.prefix / "bin"

    @property
    def wrapper(self) -> Path:
        """``<prefix>/bin/hpc-kernels``."""
        return self.bin_dir / "hpc-kernels"


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


# ----------------------------------------------------------------------------- rendering


def lua_string(text: str) -> str:
    """``text`` as a double-quoted Lua string literal: one line, every control character escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    # Lua's decimal escape \ddd (it reads up to three digits: pad when a digit follows).
    return '"' + _CONTROL_RE.sub(lambda m: _lua_byte(m.group(), escaped, m.end()), escaped) + '"'


#: Characters lua_string writes as escapes (C0 controls other than those above, DEL).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")


def _lua_byte(char: str, text: str, end: int) -> str:
    digits = str(ord(char))
    return "\\" + (digits.zfill(3) if end < len(text) and text[end].isdigit() else digits)


def lua_long_string(text: str) -> str:
    """``text`` as a Lua long string ``[==[...]==]`` whose level cannot clash with its content."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[\n{text}\n]{eq}]"


def tree_root(config: ModuleConfig) -> Path:
    """The directory relative paths are computed from: the parent of the modulefile tree."""
    return Path(os.path.normpath(config.tree)).parent


def use_relative(config: ModuleConfig) -> bool:
    """Whether the modulefile may express paths relative to its own location.

    ``auto``: yes unless the tree's parent directory is ``$HOME`` or ``/`` (not a group directory that
    moves; and a symlinked ``~/modulefiles`` would make ``myFileName()`` point elsewhere). Each path
    is then relative only when it lies under that directory (see :func:`lua_path`).
    """
    if config.path_style != "auto":
        return config.path_style == "relative"
    root = tree_root(config)
    return root not in (Path("/"), Path(os.path.normpath(Path.home())))


def _module_paths(config: ModuleConfig) -> list[Path]:
    found = [config.jupyter_path, config.bin_dir]
    if config.registry is not None:
        found.append(config.registry)
    return found


def _is_under(path: Path, root: Path) -> bool:
    norm = os.path.normpath(path)
    return os.path.commonpath([norm, os.path.normpath(root)]) == os.path.normpath(root)


def lua_path(target: Path, config: ModuleConfig, relative: bool) -> str:
    """A Lua expression for ``target``: ``pathJoin(root, "rel")`` when relative, else a literal."""
    if not relative or not _is_under(target, tree_root(config)):
        if relative and config.path_style == "relative":
            raise UsageError(
                f"{target} is not under {tree_root(config)}, so it cannot be relative to the modulefile; "
                "use --paths absolute or auto, or put it inside the tree's parent directory."
            )
        return lua_string(os.path.normpath(target))
    rel = os.path.relpath(os.path.normpath(target), tree_root(config))
    return f"pathJoin(root, {lua_string(rel)})"


def any_relative(config: ModuleConfig, relative: bool) -> bool:
    """Whether at least one path of the modulefile is written relative to it."""
    return relative and any(_is_under(p, tree_root(config)) for p in _module_paths(config))


def _help_text(config: ModuleConfig) -> str:
    lines = [
        f"{config.name} {config.version}: Jupyter kernels running in Apptainer containers (hpc-kernels).",
        "",
        "Loading this module makes the kernels installed under",
        f"  {config.jupyter_path}",
        "appear in Jupyter's kernel list (JupyterLab: load it from the 'Software Modules' panel,",
        "the kernel menu refreshes), and puts the 'hpc-kernels' command on PATH.",
        "Under JupyterHub the module is sticky: 'module purge' keeps it, so the kernels stay in the menu.",
    ]
    if config.apptainer_module:
        lines.append(f"It also loads the '{config.apptainer_module}' module when this system has one.")
    lines += ["", "Kernels already running do not see later module loads: restart them to pick up changes.",
              f"Written by 'hpc-kernels module install' (hpc-kernels {__version__})."]
    return "\n".join(lines)


def _root_block(config: ModuleConfig, relative: bool) -> templates.Block:
    if not any_relative(config, relative):
        return templates.Block("-- Paths below are absolute (they do not lie in the tree's parent group directory).")
    depth = len(Path(os.path.normpath(config.modulefile)).relative_to(tree_root(config)).parts)
    pattern = "^(.*)" + "/[^/]+" * depth + "$"
    return templates.Block(
        "-- The group directory, from this file's own location "
        f"(<root>/{templates.check_line(config.tree.name, 'the --dir name')}/{config.name}/{config.version}.lua):\n"
        "-- the paths below stay right when that directory is reached through another path or moved.\n"
        f"local root = myFileName():match({lua_string(pattern)})"
    )


def _apptainer_block(config: ModuleConfig) -> templates.Block:
    if not config.apptainer_module:
        return templates.Block(
            "-- No Apptainer module: kernels use the apptainer (or singularity) on PATH when they start.")
    name = config.apptainer_module
    missing = (
        f"{config.name}: there is no '{name}' module here and no apptainer or singularity on PATH; "
        "the kernels will appear in Jupyter but cannot start until one is available "
        "(ask your site, or set HPC_KERNELS_APPTAINER to its path)."
    )
    return templates.Block(templates.render(
        "apptainer-dependency.lua.tmpl", module=lua_string(name), missing=lua_string(missing)
    ).rstrip("\n"))


def _group_block(config: ModuleConfig) -> templates.Block:
    if config.over_module is None:
        return templates.Block("")
    use = (f"prepend_path(\"MODULEPATH\", {lua_string(os.path.normpath(config.over_tree))})\n"
           if config.over_tree is not None else "")
    return templates.Block(
        "-- Your registry extends your group's: its module first, then yours prepended before it on\n"
        "-- JUPYTER_PATH, so that a kernel of yours with the name of one of the group's wins.\n"
        f"{use}depends_on({lua_string(config.over_module)})\n\n")


def render_modulefile(config: ModuleConfig, relative: bool) -> str:
    """The Lua text of ``<name>/<version>.lua``."""
    registry = (
        f"pushenv(\"HPC_KERNELS_REGISTRY\", {lua_path(config.registry, config, relative)})"
        if config.registry is not None
        else "-- No registry was known when this module was written: HPC_KERNELS_REGISTRY is left alone."
    )
    return templates.render(
        TEMPLATE,
        marker=templates.GENERATED_MARKER,
        hpck_version=__version__,
        module_name=config.name,
        module_version=config.version,
        help=templates.Block(lua_long_string(_help_text(config))),
        whatis_name=lua_string(f"Name: {config.name}"),
        whatis_version=lua_string(f"Version: {config.version}"),
        whatis_description=lua_string(
            "Description: Jupyter kernels in Apptainer containers, listed in the JupyterLab kernel menu"
        ),
        root_block=_root_block(config, relative),
        apptainer_block=_apptainer_block(config),
        group_block=_group_block(config),
        jupyter_path=lua_path(config.jupyter_path, config, relative),
        bin_dir=lua_path(config.bin_dir, config, relative),
        registry_block=registry,
    )


def render_wrapper(config: ModuleConfig) -> str:
    """The ``<prefix>/bin/hpc-kernels`` shell wrapper."""
    return templates.render(
        WRAPPER_TEMPLATE, marker=templates.GENERATED_MARKER, hpck_version=__version__,
        program=shlex.quote(str(config.program)),
    )


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
    from hpc_kernels import group

    for f in module_plan.files:  # a member of a group tree they may not write: refused before anything
        group.ensure_writable(f.path.parent, f"write the {f.kind} {f.path}")
    # Look again now rather than trusting the plan: a file may have appeared since it was made.
    _refuse_foreign(tuple(_planned(f.path, f.kind, f.text, f.mode) for f in module_plan.files), "overwrite")
    for f in module_plan.files:
        atomic_write(f.path, f.text, f.mode)
    return [f.path for f in module_plan.files]


def remove(config: ModuleConfig) -> list[Path]:
    """Remove the modulefile and the wrapper we wrote; refuse files we did not write."""
    from hpc_kernels import group

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
    from hpc_kernels import specdirs

    kdir = config.jupyter_path / "kernels"
    if not kdir.is_dir():
        return []
    return sorted(child.name for child in kdir.iterdir() if specdirs.is_ours(child))
