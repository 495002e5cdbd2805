"""``hpc-kernels list``: the registry's kernels, their image state and where they are installed."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "list the registry's kernels: mode, image state (built/stale/missing), installed where"

#: Colours of the image states in a terminal.
COLOURS = {"built": "green", "stale": "yellow", "missing": "red", "foreign": "yellow", "external": "green",
           "external-missing": "red", "no-runtime": "red", "damaged": "red", "unreadable": "red",
           "unchecked": "yellow"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``list``."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--builds", action="store_true",
                        help="also show each image's build id (the one 'show NAME' prints and the image's labels "
                             "carry)")


def run(args: argparse.Namespace) -> int:
    """Render the registry's kernels (or JSON); name the copies of a kernelspec that another copy hides."""
    from hpc_kernels import registry, specdirs, ui
    from hpc_kernels.build import provenance, stamps
    from hpc_kernels.runtimes import table

    reg = registry.load(args.registry)
    installed = specdirs.installed_ours_all()
    rows: list[dict[str, object]] = []
    cells: list[list[ui.CellLike]] = []
    notes: list[str] = []
    base = reg.base
    theirs = _base_label(base.path) if base is not None else ""
    for entry in reg.kernels:
        state = stamps.image_state(entry).status
        image = table.get(entry.runtime).image_reference(entry)
        copies = installed.get(entry.name, [])
        overrides = str(base.path) if base is not None and entry.name in reg.overridden else None
        build_id = provenance.build_id(entry) if state not in ("missing", "external", "external-missing") else None
        rows.append({
            "kernel": entry.name, "display_name": entry.display_name, "runtime": entry.runtime,
            "mode": entry.mode, "image": image, "image_state": state, "build_id": build_id,
            "installed": str(copies[0]) if copies else None, "shadowed": [str(p) for p in copies[1:]],
            "registry": str(reg.origin(entry)), "overrides": overrides,
        })
        row: list[ui.CellLike] = [entry.name]
        if base is not None:  # a registry that extends another (a group's): whose is each kernel
            mine = reg.origin(entry) == reg.path
            row.append(ui.Cell(f"yours, over {theirs}" if overrides else "yours" if mine else theirs,
                               "cyan" if mine else ""))
        cells.append([*row, f"{entry.runtime}/{entry.mode}", ui.tilde(image) if image else "—",
                      ui.Cell(state, COLOURS.get(state, "")), *([build_id or "—"] if args.builds else []),
                      ui.tilde(copies[0]) if copies else "—"])
        notes += [_hidden_note(entry.name, copies[0], hidden) for hidden in copies[1:]]
    if base is not None and reg.overridden and not args.json:
        notes.append(f"{', '.join(reg.overridden)}: yours, from {ui.tilde(reg.path)}, instead of {theirs}'s "
                     f"in {ui.tilde(base.path)} (a kernel of your registry wins over one of the same name there).")
    if args.json:
        ui.print_json({"registry": str(reg.path), "found_via": reg.source, "kernels": rows})
        return 0
    if not rows:
        ui.plain_note(ui.no_kernels_note(reg))
        return 0
    columns = (ui.Column("kernel"), *((ui.Column("from"),) if base is not None else ()), ui.Column("runtime/mode"),
               ui.Column("image", long=True), ui.Column("state"), *((ui.Column("build"),) if args.builds else ()),
               ui.Column("installed", long=True))
    extends = f", extending {ui.tilde(base.path)}" if base is not None else ""
    ui.print_rows(columns, cells, title=f"{ui.tilde(reg.path)} (found via {reg.source}{extends})")
    for text in notes:
        ui.plain_note(text)
    return 0


def _base_label(path: Path) -> str:
    """How ``list`` names the registry another one extends: "the group" for a group tree's."""
    from hpc_kernels import grouptree

    return "the group" if grouptree.tree_of_registry(path) is not None else "the base"


def _hidden_note(name: str, used: Path, hidden: Path) -> str:
    """A copy of a kernelspec that Jupyter does not use, because another one comes first on its search path."""
    from hpc_kernels import specdirs, ui

    remove = specdirs.command("uninstall", name, hidden)
    how = f"; '{remove}' removes it" if remove else ""
    return (f"'{name}' is also installed in {ui.tilde(hidden)}, hidden by the copy in {ui.tilde(used)} "
            f"(Jupyter uses the first on its search path){how}.")
