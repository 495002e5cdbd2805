"""``hpc-kernels module install|show|uninstall``: an Lmod module that lists our kernels in Jupyter."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import __version__, grouptree, modulefile_lua, ui
from hpc_kernels.errors import HpcKernelsError, RegistryError, UsageError

if TYPE_CHECKING:
    from hpc_kernels.grouptree import GroupTree
    from hpc_kernels.modulefile_lua import ModuleConfig

HELP = "write an Lmod modulefile ('module load container-kernels') that lists our kernels in Jupyter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``module`` has sub-actions; each takes the same location flags."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    install = actions.add_parser(
        "install", help="write the modulefile tree (and, given kernel names, their kernelspecs)",
        description="Write <dir>/<name>/<version>.lua and <prefix>/bin/hpc-kernels. Given NAME... or --all, "
                    "first install those kernelspecs under --prefix (like 'hpc-kernels install --prefix').",
    )
    install.add_argument("names", nargs="*", metavar="NAME", help="kernels to install under --prefix too")
    install.add_argument("--all", action="store_true", help="install every kernel under --prefix too")
    show = actions.add_parser("show", help="print what 'module install' would write (nothing is written)")
    uninstall = actions.add_parser(
        "uninstall", help="remove the modulefile and wrapper (kernelspecs: 'hpc-kernels uninstall --prefix')")
    for sub in (install, show, uninstall):
        _add_common(sub)


def _add_common(parser: argparse.ArgumentParser) -> None:
    # Also accepted after the action (`module install --registry X`); SUPPRESS keeps an earlier value.
    parser.add_argument("--registry", metavar="PATH", default=argparse.SUPPRESS,
                        help="the kernels.yaml the module points HPC_KERNELS_REGISTRY at")
    parser.add_argument("--dir", metavar="DIR", help="the modulefile tree (default: ~/modulefiles)")
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="the Jupyter prefix whose share/jupyter goes on JUPYTER_PATH, as given to "
                             "'hpc-kernels install --prefix' (default: ~/.local/share/hpc-kernels/prefix)")
    parser.add_argument("--name", help=f"module name (default: {modulefile_lua.DEFAULT_NAME}; over a group's module: "
                                       f"{modulefile_lua.LAYERED_NAME})")
    parser.add_argument("--module-version", metavar="VERSION",
                        help="module version (default: hpc-kernels' own)")
    dep = parser.add_mutually_exclusive_group()
    dep.add_argument("--apptainer-module", metavar="NAME", default=modulefile_lua.DEFAULT_APPTAINER_MODULE,
                     help="the site's Apptainer module, loaded when it exists (default: %(default)s)")
    dep.add_argument("--no-apptainer-module", action="store_true", help="do not load any Apptainer module")
    parser.add_argument("--paths", choices=modulefile_lua.PATH_STYLES, default="auto",
                        help="paths relative to the modulefile (a relocatable group tree) or absolute "
                             "(default: auto = relative when everything lies in the tree's parent directory)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _abs(path: str) -> Path:
    # abspath, not resolve(): keep the path the user gave (a /project symlink stays /project).
    return Path(os.path.abspath(os.path.expanduser(path)))


def _registry_path(explicit: str | None) -> Path | None:
    from hpc_kernels import registry  # why: the registry (YAML) loads only when the command runs

    try:
        path, _source = registry.locate(explicit)
    except RegistryError:
        return None
    if not path.is_file():
        raise HpcKernelsError(
            f"the registry {path} does not exist; pass --registry PATH to an existing kernels.yaml.")
    return path


def config_from_args(args: argparse.Namespace) -> ModuleConfig:
    """The module configuration the flags describe.

    With the registry of a group tree (``hpc-kernels group init``), the tree's own places are the defaults.
    With a registry that extends a group's, the module loads the group's module first and puts its own
    kernels before the group's (Lmod's ``depends_on``).
    """
    registry = _registry_path(getattr(args, "registry", None))
    tree = grouptree.tree_of_registry(registry)
    base = _base_tree(registry) if tree is None else None
    default_tree = tree.modulefiles if tree else modulefile_lua.default_tree()
    default_prefix = tree.prefix if tree else modulefile_lua.default_prefix()
    if tree:
        default_name = tree.module_name
    elif base:
        default_name = modulefile_lua.LAYERED_NAME
    else:
        default_name = modulefile_lua.DEFAULT_NAME
    return modulefile_lua.ModuleConfig(
        tree=_abs(args.dir) if args.dir else default_tree,
        prefix=_abs(args.prefix) if args.prefix else default_prefix,
        program=modulefile_lua.current_program(),
        registry=registry,
        name=args.name or default_name,
        version=args.module_version or __version__,
        apptainer_module=None if args.no_apptainer_module else args.apptainer_module,
        path_style=args.paths,
        over_module=base.module_name if base else None,
        over_tree=base.modulefiles if base else None,
    )


def _base_tree(registry: Path | None) -> GroupTree | None:
    """The group tree of the registry that ``registry`` extends, if any."""
    from hpc_kernels import registry as registry_module  # why: the registry (YAML) loads only when the command runs

    if registry is None:
        return None
    try:
        base = registry_module.load_file(registry).base
    except HpcKernelsError:
        return None  # 'module install NAME' reports the registry's problems when it loads it
    return grouptree.tree_of_registry(base.path) if base is not None else None


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    config = config_from_args(args)
    if args.action == "show":
        return _show(config, args.json)
    if args.action == "uninstall":
        return _uninstall(config, args.json)
    return _install(config, args)


def _show(config: ModuleConfig, as_json: bool) -> int:
    from hpc_kernels import modulefile  # why: modulefile (and kernelspec) load only when the command runs

    module_plan = modulefile.plan(config)
    if as_json:
        data = module_plan.to_json()
        data["kernels"] = modulefile.our_kernelspecs(config)
        ui.print_json(data)
        return 0
    err = ui.console(stderr=True)
    for f in module_plan.files:
        if f.exists:
            state = "replaces our earlier file" if f.ours else "EXISTS, NOT OURS: install will refuse"
        else:
            state = "new"
        err.print(f"[bold]# {f.kind}: {ui.esc(f.path)}[/] ({state})")
        # Raw, not through rich: Lua text must come out byte for byte (no emoji/markup parsing).
        sys.stdout.write(f.text)
        sys.stdout.flush()
    return 0


def _install(config: ModuleConfig, args: argparse.Namespace) -> int:
    # why: kernelspec, modulefile and the registry (YAML) load only when the command runs.
    from hpc_kernels import kernelspec, modulefile, registry, specdirs

    if args.names and args.all:
        raise UsageError("give kernel names or --all, not both.")
    module_plan = modulefile.plan(config)
    installed: list[str] = []
    if args.names or args.all:
        reg = registry.load(getattr(args, "registry", None))
        target = specdirs.Target(user=False, prefix=str(config.prefix))
        chosen = reg.select(args.names, args.all)
        if args.all and not chosen:
            ui.plain_note(ui.no_kernels_note(reg))
        for entry in chosen:
            kernelspec.install(entry, target, reg.origin(entry))
            installed.append(entry.name)
    written = modulefile.write(module_plan)
    kernels = modulefile.our_kernelspecs(config)
    if args.json:
        data = module_plan.to_json()
        data.pop("files")
        data.update(written=[str(p) for p in written], kernels=kernels, installed_kernelspecs=installed)
        ui.print_json(data)
        return 0
    err = ui.console(stderr=True)
    esc = ui.esc
    for name in installed:
        err.print(f"[green]✓[/] installed kernelspec '{esc(name)}' under {esc(config.jupyter_path / 'kernels')}")
    for path in written:
        err.print(f"[green]✓[/] wrote {esc(path)}")
    if kernels:
        err.print(f"Loading the module lists these kernels: {', '.join(kernels)}", markup=False)
    else:
        err.print(f"[yellow]note:[/] no hpc-kernels kernelspecs under {esc(config.jupyter_path)} yet: run "
                  f"'hpc-kernels install --prefix {esc(config.prefix)} NAME' (or 'module install NAME').")
    err.print(f"Use it: module use {config.tree} && module load {config.name}", markup=False)
    err.print("In JupyterHub, put the 'module use' line in ~/.bashrc so the Software Modules panel "
              "sees the tree in new sessions.")
    return 0


def _uninstall(config: ModuleConfig, as_json: bool) -> int:
    from hpc_kernels import modulefile  # why: modulefile (and kernelspec) load only when the command runs

    removed = modulefile.remove(config)
    if as_json:
        ui.print_json({"removed": [str(p) for p in removed]})
        return 0
    err = ui.console(stderr=True)
    for path in removed:
        err.print(f"[green]✓[/] removed {ui.esc(path)}")
    if not removed:
        err.print(f"nothing to remove: no {config.modulefile} and no {config.wrapper}", markup=False)
    return 0
