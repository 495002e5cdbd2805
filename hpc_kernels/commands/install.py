"""``hpc-kernels install``: write Jupyter kernelspecs for registry kernels."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hpc_kernels import ui

if TYPE_CHECKING:
    from pathlib import Path

    from hpc_kernels.kernelspec import Placement, Target

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
    """Install each selected kernel's kernelspec.

    Without a target flag, a kernel whose copy in the user directory Jupyter would not use (another copy
    comes first on its search path, e.g. from ``module load container-kernels``) is refused before anything
    is written: one kernel name, one copy the user can see. With ``--user``/``--prefix``/``--sys-prefix``
    the copy is written and the output says which copy Jupyter uses.
    """
    from hpc_kernels import build, kernelspec, registry

    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    target = kernelspec.Target.from_flags(args.prefix, args.sys_prefix)
    explicit = bool(args.user or args.prefix or args.sys_prefix)
    places = kernelspec.placements([entry.name for entry in entries], target)
    if not explicit:
        for entry in entries:
            if places[entry.name].ahead:
                raise _hidden_error(entry.name, places[entry.name].ahead[0], target)
    done = []
    for entry in entries:
        path = kernelspec.install(entry, target, reg.path)
        state = build.image_state(entry).status
        image = str(entry.image) if entry.runtime == "apptainer" else str(entry.container_image)
        done.append({"kernel": entry.name, "kernelspec": str(path), "image": image, "image_state": state})
        if not args.json:
            ui.say(f"installed kernelspec '{entry.name}' ({entry.display_name}) in {ui.tilde(path)}", "✓", "green")
            if state in ("missing", "external-missing"):
                ui.say(f"its image {ui.tilde(image)} does not exist yet: run 'hpc-kernels build {entry.name}'",
                       "note:", "yellow", indent="  ")
            elif state == "damaged":
                ui.say(f"its image is damaged (not the file that was built): run 'hpc-kernels build {entry.name}'",
                       "note:", "yellow", indent="  ")
            elif state == "stale":
                ui.say(f"its image is older than its recipe: run 'hpc-kernels build {entry.name}'",
                       "note:", "yellow", indent="  ")
            elif state == "no-runtime":
                ui.say(f"'{entry.runtime}' is not installed here: the kernel needs it to start",
                       "note:", "yellow", indent="  ")
            _say_placement(entry.name, path, places[entry.name])
    if args.json:
        ui.print_json(done)
    elif done:
        ui.say("Restart your JupyterLab session (or reload the page) to see new kernels in the menu.")
    return 0


def _hidden_error(name: str, first: Path, target: Target) -> Exception:
    """Refusing a copy Jupyter would not use: which copy it uses instead, and the two ways on."""
    from hpc_kernels import kernelspec
    from hpc_kernels.errors import HpcKernelsError

    where = target.kernels_dir()
    if not kernelspec.is_ours(first):
        return HpcKernelsError(
            f"a kernelspec '{name}' in {where} would be hidden: Jupyter uses the '{name}' in {first}, which "
            "hpc-kernels did not write; rename the kernel in the registry (or pass --user to install the "
            "hidden copy anyway).")
    update = kernelspec.command("install", name, first)
    how = f"update that one with '{update}'" if update else "update that one"
    return HpcKernelsError(
        f"a kernelspec '{name}' in {where} would be hidden: Jupyter uses the copy in {first} (it comes first "
        f"on Jupyter's search path, e.g. from 'module load container-kernels'); {how}, or pass --user to "
        "install the hidden copy anyway.")


def _say_placement(name: str, path: Path, place: Placement) -> None:
    """Notes on a copy Jupyter will not use, or on copies this one hides."""
    from hpc_kernels import kernelspec

    if not place.on_path:
        now = f" (for now it uses the '{name}' in {ui.tilde(place.ahead[0])})" if place.ahead else ""
        ui.say(f"{ui.tilde(path.parent.parent)} is not on Jupyter's search path{now}: add it to JUPYTER_PATH "
               "('module load container-kernels' does that for a module tree).", "note:", "yellow", indent="  ")
    elif place.ahead:
        ui.say(f"Jupyter uses the '{name}' in {ui.tilde(place.ahead[0])}, which comes first on its search "
               f"path: this copy is hidden while that one is there.", "!", "yellow", indent="  ")
    for hidden in place.behind:
        remove = kernelspec.command("uninstall", name, hidden)
        how = f": '{remove}' removes it" if remove else ""
        ui.say(f"this copy hides the '{name}' in {ui.tilde(hidden)}{how}.", "note:", "yellow", indent="  ")
