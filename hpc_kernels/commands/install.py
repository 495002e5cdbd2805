"""``hpc-kernels install``: write Jupyter kernelspecs for registry kernels."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hpc_kernels import ui

if TYPE_CHECKING:
    from pathlib import Path

    from hpc_kernels.grouptree import GroupTree
    from hpc_kernels.registry import Registry
    from hpc_kernels.specdirs import Placement, Target

HELP = "install Jupyter kernelspecs so the kernels appear in the JupyterLab kernel menu"


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--user`` (default), ``--prefix DIR`` or ``--sys-prefix``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true",
                       help="the user's Jupyter data dir (default; with the registry of a group tree: the tree)")
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
    from hpc_kernels import grouptree, kernelspec, registry, specdirs
    from hpc_kernels.build import stamps
    from hpc_kernels.runtimes import table

    reg = registry.load(args.registry)
    entries = ui.selected(reg, args)
    explicit = bool(args.user or args.prefix or args.sys_prefix)
    tree = grouptree.tree_of_registry(reg.path)
    # The registry of a group tree publishes into the tree (kernelspecs and module), for every member.
    target = specdirs.Target.from_flags(str(tree.prefix) if tree and not explicit else args.prefix,
                                          args.sys_prefix)
    places = specdirs.placements([entry.name for entry in entries], target)
    if not explicit:
        for entry in entries:
            if places[entry.name].ahead:
                raise _hidden_error(entry.name, places[entry.name].ahead[0], target, reg)
    done = []
    for entry in entries:
        notes: list[str] = []
        path = kernelspec.install(entry, target, reg.origin(entry), on_note=notes.append)
        state = stamps.image_state(entry).status
        image = table.get(entry.runtime).image_reference(entry)
        done.append({"kernel": entry.name, "kernelspec": str(path), "image": image, "image_state": state})
        if not args.json:
            shown = kernelspec.display_name(entry)
            ui.say(f"installed kernelspec '{entry.name}' ({shown}) in {ui.tilde(path)}", "✓", "green")
            for note in notes:
                ui.say(note, "note:", "yellow", indent="  ")
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
    published = _publish_module(tree, target, reg.path) if tree and done else None
    if args.json:
        ui.print_json(done)
    elif done:
        if published is not None and tree is not None:
            ui.say(f"the module of the group {tree.group}: {published}", "✓", "green")
            ui.say(f"members: module use {tree.modulefiles} && module load {tree.module_name}", indent="  ")
        ui.say("Restart your JupyterLab session (or reload the page) to see new kernels in the menu.")
    return 0


def _publish_module(tree: GroupTree, target: Target, registry: Path) -> Path | None:
    """After installing into a group tree's prefix: (re)write the tree's module, so that one command
    (``build --then-install``) publishes everything members load. Returns the modulefile (None when
    the kernelspecs went elsewhere)."""
    import os

    from hpc_kernels import group, modulefile, modulefile_lua

    if target.prefix is None or os.path.realpath(target.prefix) != os.path.realpath(tree.prefix):
        return None
    group.publish_inputs([registry])  # members' hpc-kernels read it (HPC_KERNELS_REGISTRY of the module)
    config = modulefile_lua.ModuleConfig(tree=tree.modulefiles, prefix=tree.prefix,
                                         program=modulefile_lua.current_program(), registry=registry,
                                         name=tree.module_name)
    plan = modulefile.plan(config)
    if any(not f.exists or _differs(f.path, f.text) for f in plan.files):
        modulefile.write(plan)
    return config.modulefile


def _differs(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") != text
    except OSError:
        return True


def _hidden_error(name: str, first: Path, target: Target, reg: Registry | None = None) -> Exception:
    """Refusing a copy Jupyter would not use: which copy it uses instead, and the two ways on."""
    from hpc_kernels import specdirs
    from hpc_kernels.errors import HpcKernelsError

    where = target.kernels_dir()
    if reg is not None and name in reg.overridden and reg.base is not None:
        return HpcKernelsError(
            f"your kernel '{name}' overrides the one of {reg.base.path}, whose kernelspec ({first}) comes first "
            "on Jupyter's search path (the group's module); to put yours first, publish your kernels as a module "
            "that loads the group's before them: 'hpc-kernels module install --all', then 'module load "
            "my-kernels' (or pass --user to install the hidden copy anyway).")
    if not specdirs.is_ours(first):
        return HpcKernelsError(
            f"a kernelspec '{name}' in {where} would be hidden: Jupyter uses the '{name}' in {first}, which "
            "hpc-kernels did not write; rename the kernel in the registry (or pass --user to install the "
            "hidden copy anyway).")
    update = specdirs.command("install", name, first)
    how = f"update that one with '{update}'" if update else "update that one"
    return HpcKernelsError(
        f"a kernelspec '{name}' in {where} would be hidden: Jupyter uses the copy in {first} (it comes first "
        f"on Jupyter's search path, e.g. from 'module load container-kernels'); {how}, or pass --user to "
        "install the hidden copy anyway.")


def _say_placement(name: str, path: Path, place: Placement) -> None:
    """Notes on a copy Jupyter will not use, or on copies this one hides."""
    from hpc_kernels import specdirs

    if not place.on_path:
        now = f" (for now it uses the '{name}' in {ui.tilde(place.ahead[0])})" if place.ahead else ""
        ui.say(f"{ui.tilde(path.parent.parent)} is not on Jupyter's search path{now}: add it to JUPYTER_PATH "
               "('module load container-kernels' does that for a module tree).", "note:", "yellow", indent="  ")
    elif place.ahead:
        ui.say(f"Jupyter uses the '{name}' in {ui.tilde(place.ahead[0])}, which comes first on its search "
               f"path: this copy is hidden while that one is there.", "!", "yellow", indent="  ")
    for hidden in place.behind:
        remove = specdirs.command("uninstall", name, hidden)
        how = f": '{remove}' removes it" if remove else ""
        ui.say(f"this copy hides the '{name}' in {ui.tilde(hidden)}{how}.", "note:", "yellow", indent="  ")
