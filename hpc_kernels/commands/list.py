"""``hpc-kernels list``: the registry's kernels, their image state and where they are installed."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "list the registry's kernels: mode, image state (built/stale/missing), installed where"

#: Colours of the image states in a terminal.
COLOURS = {"built": "green", "stale": "yellow", "missing": "red", "foreign": "yellow", "external": "green",
           "external-missing": "red", "no-runtime": "red", "damaged": "red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``list``."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Render the registry's kernels (or JSON); name the copies of a kernelspec that another copy hides."""
    from hpc_kernels import build, kernelspec, registry, ui

    reg = registry.load(args.registry)
    installed = kernelspec.installed_ours_all()
    rows: list[dict[str, object]] = []
    cells: list[list[ui.CellLike]] = []
    notes: list[str] = []
    for entry in reg.kernels:
        state = build.image_state(entry).status
        image = str(entry.image) if entry.runtime == "apptainer" else entry.container_image
        copies = installed.get(entry.name, [])
        rows.append({
            "kernel": entry.name, "display_name": entry.display_name, "runtime": entry.runtime,
            "mode": entry.mode, "image": image, "image_state": state,
            "installed": str(copies[0]) if copies else None, "shadowed": [str(p) for p in copies[1:]],
        })
        cells.append([entry.name, f"{entry.runtime}/{entry.mode}", ui.tilde(image) if image else "—",
                      ui.Cell(state, COLOURS.get(state, "")), ui.tilde(copies[0]) if copies else "—"])
        notes += [_hidden_note(entry.name, copies[0], hidden) for hidden in copies[1:]]
    if args.json:
        ui.print_json({"registry": str(reg.path), "found_via": reg.source, "kernels": rows})
        return 0
    if not rows:
        ui.plain_note(ui.no_kernels_note(reg))
        return 0
    columns = (ui.Column("kernel"), ui.Column("runtime/mode"), ui.Column("image", long=True),
               ui.Column("state"), ui.Column("installed", long=True))
    ui.print_rows(columns, cells, title=f"{ui.tilde(reg.path)} (found via {reg.source})")
    for text in notes:
        ui.plain_note(text)
    return 0


def _hidden_note(name: str, used: Path, hidden: Path) -> str:
    """A copy of a kernelspec that Jupyter does not use, because another one comes first on its search path."""
    from hpc_kernels import kernelspec, ui

    remove = kernelspec.command("uninstall", name, hidden)
    how = f"; '{remove}' removes it" if remove else ""
    return (f"'{name}' is also installed in {ui.tilde(hidden)}, hidden by the copy in {ui.tilde(used)} "
            f"(Jupyter uses the first on its search path){how}.")
