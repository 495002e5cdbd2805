"""``hpc-kernels gc``: sweep leftovers (stale instance state, orphaned kernels, what killed kernels left,
containers, kernelspecs without image)."""

from __future__ import annotations

import argparse

HELP = ("sweep leftovers: stale instance state, orphaned kernel processes, what killed kernels left "
        "(squashfuse_ll), kernelspecs whose image is gone, job kernels' Slurm jobs whose launcher is gone")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gc``."""
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Run every sweeper and report what each found."""
    from dataclasses import asdict

    from hpc_kernels import gc, ui

    found = gc.sweep(dry_run=args.dry_run, registry=args.registry)
    if args.json:
        ui.print_json({"dry_run": args.dry_run, "findings": [asdict(f) for f in found]})
        return 0
    if not found:
        ui.say("nothing to clean up.")
        return 0
    for f in found:
        if args.dry_run:
            ui.say(f"{f.sweeper}: {f.target}: {would(f.action)} ({f.reason})", "-")
        else:
            ui.say(f"{f.sweeper}: {f.target}: {f.action} ({f.reason})", "✓", "green")
    if args.dry_run:
        ui.say("dry run: nothing was changed; run 'hpc-kernels gc' to do the above.")
    return 0


#: Past-tense actions of the sweepers (leftovers.Leftover.action) and what --dry-run says instead.
_PLANNED = {"removed": "would remove", "restarted": "would restart", "stopped": "would stop",
            "killed": "would kill", "left": "would leave", "cancelled": "would cancel"}


def would(action: str) -> str:
    """What a sweeper would do: 'removed stale state' -> 'would remove stale state'."""
    if action.startswith("would "):  # the sweeper said it itself
        return action
    verb, _, rest = action.partition(" ")
    planned = _PLANNED.get(verb)
    return f"{planned} {rest}".rstrip() if planned else f"{action} (not done: dry run)"
