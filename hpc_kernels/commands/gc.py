"""``hpc-kernels gc``: sweep leftovers (stale instance state, orphaned kernels, what killed kernels left,
containers, kernelspecs without image)."""

from __future__ import annotations

import argparse

HELP = ("sweep leftovers: stale instance state, orphaned kernel processes, what killed kernels left "
        "(squashfuse_ll), kernelspecs whose image is gone")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gc``."""
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Run every sweeper and report what each found."""
    from dataclasses import asdict

    from hpc_kernels import gc, ui

    found = gc.sweep(dry_run=args.dry_run)
    if args.json:
        ui.print_json({"dry_run": args.dry_run, "findings": [asdict(f) for f in found]})
        return 0
    if not found:
        ui.note("nothing to clean up.")
    for f in found:
        action = f"would have {f.action}" if args.dry_run else f.action
        ui.note(f"[green]✓[/] {f.sweeper}: {f.target}: {action} ({f.reason})")
    return 0
