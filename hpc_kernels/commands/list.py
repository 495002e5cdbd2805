"""``hpc-kernels list``: the registry's kernels, their image state and where they are installed."""

from __future__ import annotations

import argparse

HELP = "list the registry's kernels: mode, image state (built/stale/missing), installed where"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``list``."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Render the registry as a table (or JSON)."""
    from hpc_kernels import build, kernelspec, registry, ui

    reg = registry.load(args.registry)
    installed = kernelspec.installed_ours()
    rows = []
    for entry in reg.kernels:
        state = build.image_state(entry).status
        where = installed.get(entry.name)
        rows.append({
            "kernel": entry.name, "display_name": entry.display_name, "runtime": entry.runtime,
            "mode": entry.mode, "image": str(entry.image) if entry.runtime == "apptainer" else entry.container_image,
            "image_state": state, "installed": str(where) if where else None,
        })
    if args.json:
        ui.print_json({"registry": str(reg.path), "found_via": reg.source, "kernels": rows})
        return 0
    from rich.table import Table

    colours = {"built": "green", "stale": "yellow", "missing": "red", "foreign": "yellow", "external": "green",
               "external-missing": "red", "no-runtime": "red"}
    table = Table(title=f"{reg.path} (found via {reg.source})", title_justify="left")
    for col in ("kernel", "runtime/mode", "image", "state", "installed"):
        table.add_column(col, overflow="fold")
    for row in rows:
        colour = colours.get(str(row["image_state"]), "white")
        table.add_row(str(row["kernel"]), f"{row['runtime']}/{row['mode']}", str(row["image"]),
                      f"[{colour}]{row['image_state']}[/]", str(row["installed"] or "—"))
    ui.console().print(table)
    return 0
