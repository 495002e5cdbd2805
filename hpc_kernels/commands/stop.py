"""``hpc-kernels stop``: stop shared instances on this node (and the kernels attached to them)."""

from __future__ import annotations

import argparse

HELP = "stop shared instances on this node, killing the kernels attached to them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``stop``."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="an instance (see 'hpc-kernels instances'), or a kernel: all its instances")
    parser.add_argument("--all", action="store_true", help="stop every shared instance of ours on this node")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Stop the selected instances."""
    import hpc_kernels.runtimes.apptainer.status as instances
    from hpc_kernels import ui
    from hpc_kernels.errors import UsageError

    if not args.names and not args.all:
        raise UsageError("name an instance (or kernel), or pass --all.")
    if args.names and args.all:
        raise UsageError("give names or --all, not both.")
    done = [instances.stop(name) for name in instances.resolve_names(list(args.names), args.all)]
    if args.json:
        ui.print_json({"stopped": [{"name": s.name, "was_running": s.was_running,
                                    "kernels": s.kernels} for s in done]})
        return 0
    if not done:
        ui.note("no shared instances on this node.")
    for s in done:
        what = "stopped" if s.was_running else "forgot dead instance"
        ui.note(f"[green]✓[/] {what} {ui.esc(s.name)} ({s.kernels} attached kernel(s) ended)")
    return 0
