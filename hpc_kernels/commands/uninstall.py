"""``hpc-kernels uninstall``: remove kernelspecs that hpc-kernels installed (never others)."""

from __future__ import annotations

import argparse

from hpc_kernels.commands.install import add_target

HELP = "remove kernelspecs that hpc-kernels installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``uninstall``: names need not be in the registry any more."""
    parser.add_argument("names", nargs="*", metavar="NAME", help="kernelspecs to remove")
    parser.add_argument("--all", action="store_true", help="remove every kernelspec of ours in the target")
    add_target(parser)


def run(args: argparse.Namespace) -> int:
    """Remove the named kernelspecs (or all of ours) from the target dir."""
    from hpc_kernels import kernelspec, ui
    from hpc_kernels.errors import UsageError

    target = kernelspec.Target.from_flags(args.prefix, args.sys_prefix)
    names = list(args.names)
    if args.all:
        kdir = target.kernels_dir()
        names += [p.name for p in sorted(kdir.iterdir()) if kernelspec.is_ours(p)] if kdir.is_dir() else []
    elif not names:
        raise UsageError("name at least one kernelspec, or pass --all.")
    for name in dict.fromkeys(names):
        path = kernelspec.uninstall(name, target)
        ui.note(f"[green]✓[/] removed kernelspec '{ui.esc(name)}' ({ui.esc(path)})")
    return 0
