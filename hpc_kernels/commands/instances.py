"""``hpc-kernels instances``: our shared Apptainer instances on this node."""

from __future__ import annotations

import argparse

HELP = "list the shared instances (mode: instance) running on this node: kernels attached, idle time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``instances``."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """This node's instances, one per row, names whole (``stop`` needs them); or JSON."""
    import time

    import hpc_kernels.runtimes.apptainer.status as instances
    from hpc_kernels import paths, ui

    now = time.time()
    found = instances.list_instances()
    problems = instances.damaged_records()
    if args.json:
        ui.print_json({"host": paths.hostname(), "instances": [s.to_json(now) for s in found],
                       "problems": problems})
        return 0
    for problem in problems:
        ui.say(problem, "warning:", "yellow")
    if not found:
        ui.note(f"no shared instances on this node ({ui.esc(paths.hostname())}).")
        return 0
    columns = (ui.Column("name"), ui.Column("kernel"), ui.Column("image", long=True), ui.Column("state"),
               ui.Column("kernels"), ui.Column("idle for"))
    rows: list[list[ui.CellLike]] = []
    for st in found:
        idle = st.idle_for(now)
        idle_text = "—" if idle is None else f"{idle:.0f} s (stops after {st.idle_timeout:g} s)"
        state = ui.Cell("running", "green") if st.state == "running" else \
            ui.Cell("dead (run 'hpc-kernels gc')", "red")
        rows.append([st.name, st.kernel, ui.tilde(st.image), state, str(st.kernels), idle_text])
    ui.print_rows(columns, rows, title=f"shared instances on {paths.hostname()}")
    return 0
