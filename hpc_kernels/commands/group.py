"""``hpc-kernels group init DIR``: a group tree in /project, from which one member publishes kernels for all."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hpc_kernels import group, grouptree, ui

HELP = "set up (or repair) a group tree in /project: one member builds and publishes, the whole group uses"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``group`` has one action, ``init``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    init = actions.add_parser(
        "init", help="create DIR as a group tree, or repair the modes of an existing one",
        description="Create DIR (inside the group's setgid directory, e.g. /project/def-pi/kernels) with "
                    "defs/, images/, share/jupyter/kernels/, modulefiles/ and a starter kernels.yaml, owned by the "
                    "group and readable by it whatever your umask. Run again, it repairs the modes of everything "
                    "of yours in the tree.")
    init.add_argument("dir", metavar="DIR", help="the tree (created if missing; its parent must exist)")
    init.add_argument("--group", metavar="GROUP",
                      help="the group it is for (default: the group of DIR's setgid parent directory)")
    init.add_argument("--members", choices=group.MEMBERS,
                      help="'read': only you build and publish (default); 'write': every member may, too")
    init.add_argument("--module-name", metavar="NAME",
                      help=f"the module members load (default: {grouptree.DEFAULT_MODULE})")
    init.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """Create or repair the tree, then say what to do next (the maintainer's and the members' steps)."""
    done = group.init(_abs(args.dir), args.group, args.members, args.module_name)
    tree = done.tree
    if args.json:
        data = tree.to_json()
        data.update(created=[str(p) for p in done.created], repaired=[str(p) for p in done.repaired],
                    not_yours=[str(p) for p in done.others], warnings=list(done.warnings))
        ui.print_json(data)
        return 0
    who = "members may build and publish too" if tree.members_write else "members read, only you write"
    ui.say(f"group tree {tree.root} for the group {tree.group} ({who})", "✓", "green")
    for path in done.created:
        ui.say(f"created {path}", indent="  ")
    if done.repaired:
        ui.say(f"gave {len(done.repaired)} file(s) and directories of yours the tree's group and modes",
               indent="  ")
    if done.others:
        shown = ", ".join(str(p) for p in done.others[:3]) + (" …" if len(done.others) > 3 else "")
        ui.say(f"{len(done.others)} entries belong to other users and keep their modes ({shown}): their owners "
               "can run 'hpc-kernels group init' on the tree too, or chmod them", "note:", "yellow", indent="  ")
    for warning in done.warnings:
        ui.say(warning, "!", "yellow", indent="  ")
    ui.say("Next, as the maintainer: put recipes in defs/ and kernels in kernels.yaml, then")
    ui.say(f"hpc-kernels build --all --registry {tree.registry} --slurm --then-install", indent="  ")
    ui.say("(images, kernelspecs and the module land in the tree). Every member, once:")
    ui.say(f"module use {tree.modulefiles} && module load {tree.module_name}", indent="  ")
    return 0


def _abs(path: str) -> Path:
    # abspath, not resolve(): keep the path the user gave (a /project symlink stays /project).
    return Path(os.path.abspath(os.path.expanduser(path)))
