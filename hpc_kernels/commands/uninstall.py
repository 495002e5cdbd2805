"""``hpc-kernels uninstall``: remove kernelspecs that hpc-kernels installed (never others)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hpc_kernels.commands.install import add_target

if TYPE_CHECKING:
    from hpc_kernels.grouptree import GroupTree

HELP = "remove kernelspecs that hpc-kernels installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``uninstall``: names need not be in the registry any more."""
    parser.add_argument("names", nargs="*", metavar="NAME", help="kernelspecs to remove")
    parser.add_argument("--all", action="store_true", help="remove every kernelspec of ours in the target")
    add_target(parser)


def run(args: argparse.Namespace) -> int:
    """Remove the named kernelspecs (or all of ours) from the target dir; say what Jupyter still shows."""
    from hpc_kernels import kernelspec, specdirs, ui
    from hpc_kernels.errors import UsageError

    target = specdirs.Target.from_flags(args.prefix, args.sys_prefix)
    if not (args.user or args.prefix or args.sys_prefix):
        tree = _group_tree(args.registry)
        if tree is not None:  # the registry of a group tree: its kernelspecs are the tree's
            target = specdirs.Target.from_flags(str(tree.prefix), False)
    names = list(args.names)
    kdir = target.kernels_dir()
    if args.all:
        names += [p.name for p in sorted(kdir.iterdir())
                  if specdirs.is_ours(p) or specdirs.half_written(p)] if kdir.is_dir() else []
        if not names:
            ui.say(f"nothing to remove: no kernelspecs of hpc-kernels in {ui.tilde(kdir)}.")
            return 0
    elif not names:
        raise UsageError("name at least one kernelspec, or pass --all.")
    for name in dict.fromkeys(names):
        path = kernelspec.uninstall(name, target)
        ui.say(f"removed kernelspec '{name}' ({ui.tilde(path)})", "✓", "green")
        remaining = specdirs.copies(name)
        if remaining:
            remove = specdirs.command("uninstall", name, remaining[0]) if specdirs.is_ours(remaining[0]) \
                else None
            how = f" ('{remove}' removes it)" if remove else ""
            ui.say(f"'{name}' is still in Jupyter's kernel menu: it now uses the copy in "
                   f"{ui.tilde(remaining[0])}{how}.", "!", "yellow", indent="  ")
    return 0


def _group_tree(explicit: str | None) -> GroupTree | None:
    """The group tree of the registry in use, if it is a group's (no registry at all is fine here)."""
    from hpc_kernels import grouptree, registry
    from hpc_kernels.errors import RegistryError

    try:
        path, _source = registry.locate(explicit)
    except RegistryError:
        return None
    return grouptree.tree_of_registry(path)
