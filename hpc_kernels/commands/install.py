"""``hpc-kernels install``: write Jupyter kernelspecs for registry kernels."""

from __future__ import annotations

import argparse

from hpc_kernels import ui

HELP = "install Jupyter kernelspecs so the kernels appear in the JupyterLab kernel menu"


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--user`` (default), ``--prefix DIR`` or ``--sys-prefix``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="the user's Jupyter data dir (default)")
    where.add_argument("--prefix", metavar="DIR", help="DIR/share/jupyter/kernels (e.g. for a module tree)")
    where.add_argument("--sys-prefix", action="store_true", help="this Python environment's share/jupyter/kernels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``install``."""
    ui.add_selection(parser, "install")
    add_target(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Install each selected kernel's kernelspec."""
    from hpc_kernels import build, kernelspec, registry

    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    target = kernelspec.Target.from_flags(args.prefix, args.sys_prefix)
    err = ui.console(stderr=True)
    done = []
    for entry in entries:
        path = kernelspec.install(entry, target, reg.path)
        state = build.image_state(entry).status
        image = str(entry.image) if entry.runtime == "apptainer" else str(entry.container_image)
        done.append({"kernel": entry.name, "kernelspec": str(path), "image": image, "image_state": state})
        if not args.json:
            esc = ui.esc
            err.print(f"[green]✓[/] installed kernelspec '{esc(entry.name)}' ({esc(entry.display_name)}) "
                      f"in {esc(path)}")
            if state in ("missing", "external-missing"):
                err.print(f"  [yellow]note:[/] its image {esc(image)} does not exist yet: "
                          f"run 'hpc-kernels build {esc(entry.name)}'")
            elif state == "stale":
                err.print("  [yellow]note:[/] its image is older than its recipe: "
                          f"run 'hpc-kernels build {esc(entry.name)}'")
            elif state == "no-runtime":
                err.print(f"  [yellow]note:[/] '{esc(entry.runtime)}' is not installed here: "
                          "the kernel needs it to start")
    if args.json:
        ui.print_json(done)
    elif done:
        err.print("Restart your JupyterLab session (or reload the page) to see new kernels in the menu.")
    return 0
