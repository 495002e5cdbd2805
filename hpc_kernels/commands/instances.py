"""``hpc-kernels instances``: our shared Apptainer instances on this node."""

from __future__ import annotations

import argparse

HELP = "list the shared instances (mode: instance) running on this node: kernels attached, idle time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``instances``."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Render this node's instances as a table (or JSON)."""
    import time

    from hpc_kernels import instances, paths, ui

    now = time.time()
    found = instances.list_instances()
    if args.json:
        ui.print_json({"host": paths.hostname(), "instances": [s.to_json(now) for s in found]})
        return 0
    if not found:
        ui.note(f"no shared instances on this node ({ui.esc(paths.hostname())}).")
        return 0
    from rich.table import Table

    table = Table(title=ui.cell(f"shared instances on {paths.hostname()}"), title_justify="left")
    for col in ("name", "kernel", "image", "state", "kernels", "idle for"):
        table.add_column(col, overflow="fold")
    for st in found:
        idle = st.idle_for(now)
        idle_text = "—" if idle is None else f"{idle:.0f} s (stops after {st.idle_timeout:g} s)"
        state = "[green]running[/]" if st.state == "running" else "[red]dead[/] (run 'hpc-kernels gc')"
        table.add_row(ui.cell(st.name), ui.cell(st.kernel), ui.cell(st.image), state, str(st.kernels), idle_text)
    ui.console().print(table)
    return 0
