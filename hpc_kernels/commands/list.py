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
    colours = {"built": "green", "stale": "yellow", "missing": "red", "foreign": "yellow", "external": "green",
               "external-missing": "red", "no-runtime": "red"}
    title = f"{reg.path} (found via {reg.source})"
    cells = [(str(row["kernel"]), f"{row['runtime']}/{row['mode']}", str(row["image"]),
              str(row["image_state"]), str(row["installed"] or "—")) for row in rows]
    if len(cells) > TABLE_MAX_ROWS:
        _columns(title, cells, colours)
        return 0
    from rich.table import Table

    table = Table(title=ui.cell(title), title_justify="left")
    for col in HEADER:
        table.add_column(col, overflow="fold")
    for kernel, mode, image, state, place in cells:
        # Cells as Text: a path or name is shown as written, never read as markup.
        table.add_row(ui.cell(kernel), ui.cell(mode), ui.cell(image), ui.cell(state, colours.get(state, "white")),
                      ui.cell(place))
    ui.console().print(table)
    return 0


HEADER = ("kernel", "runtime/mode", "image", "state", "installed")
#: Past this many kernels rich's Table takes most of a second to lay out (0.5 s for 500 rows on a
#: 2-core node); big registries get plain aligned columns instead (docs/performance.md).
TABLE_MAX_ROWS = 100


def _columns(title: str, cells: list[tuple[str, str, str, str, str]], colours: dict[str, str]) -> None:
    """The same columns as the table, aligned with spaces, the state coloured: linear time."""
    from rich.text import Text

    from hpc_kernels import ui

    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    out = Text(title + "\n", style="italic")
    out.append("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)).rstrip() + "\n", style="bold")
    last = len(HEADER) - 1
    for row in cells:
        for i, (cell, width) in enumerate(zip(row, widths)):
            style = colours.get(cell, "") if i == 3 else ""
            out.append(cell if i == last else cell.ljust(width) + "  ", style=style)
        out.append("\n")
    ui.console().print(out, end="")
