"""Checks of what is installed: kernelspecs, group trees, and each installed kernel's launcher."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from hpc_kernels import access, group, grouptree, kernelspec, proc, specdirs
from hpc_kernels.doctor.base import FAIL, OK, WARN, Context, Finding, _last_line
from hpc_kernels.doctor.kernelchecks import _launcher_prefix, disable_user_config_source
from hpc_kernels.errors import ToolError
from hpc_kernels.launchspec import KernelSpecError, read_kernel_json
from hpc_kernels.model import KernelEntry, Runtime
from hpc_kernels.registry import Registry


def check_kernelspec(entry: KernelEntry, ctx: Context) -> Finding:
    """Is the kernelspec where Jupyter looks, ours, and not hidden by JupyterHub?"""
    found = specdirs.visible(entry.name)
    dirs = ", ".join(str(d) for d in specdirs.search_dirs())
    if found is None:
        for spec in specdirs.unreadable(entry.name):
            why = group.explain_unreadable(spec / "kernel.json")
            if why:
                return Finding("kernelspec", FAIL, f"Jupyter does not list the kernelspec {spec}: {why}",
                               "restart your JupyterLab session once it is fixed.", entry.name)
        module = _module_hint(entry, ctx)
        if module:
            return Finding("kernelspec", FAIL,
                           f"no kernelspec '{entry.name}' in the directories Jupyter searches: {dirs}; it is "
                           f"published in the group tree {module[0]}, whose module is not loaded here.",
                           f"{module[1]}, then restart your JupyterLab session (in JupyterHub: put the 'module "
                           "use' line in ~/.bashrc, or load the module in the Software Modules panel).", entry.name)
        return Finding("kernelspec", FAIL,
                       f"no kernelspec '{entry.name}' in the directories Jupyter searches: {dirs}.",
                       f"run 'hpc-kernels install {entry.name}' (if you installed it with --prefix DIR, add "
                       "DIR/share/jupyter to JUPYTER_PATH: 'module load container-kernels' does that), then "
                       "restart your JupyterLab session.", entry.name)
    hidden = [p for p in specdirs.copies(entry.name) if p != found]
    if not specdirs.is_ours(found):
        ours = [p for p in hidden if specdirs.is_ours(p)]
        mine = f"; the one hpc-kernels wrote, {ours[0]}, is hidden by it" if ours else ""
        return Finding("kernelspec", FAIL,
                       f"the kernelspec Jupyter uses for '{entry.name}' ({found}) was not written by "
                       f"hpc-kernels{mine}.",
                       f"rename the kernel in the registry, or remove {found} yourself.", entry.name)
    hub = disable_user_config_source(ctx)
    if hub and _under(found, ctx.home):
        return Finding("kernelspec", FAIL,
                       f"kernelspec {found} is under your home, which JupyterHub hides "
                       f"(disable_user_config is on: {hub}).",
                       f"install it outside $HOME ('hpc-kernels install {entry.name} --prefix /project/...') "
                       "and put that prefix's share/jupyter on JUPYTER_PATH "
                       "('module load container-kernels'), then restart your JupyterLab session.", entry.name)
    if hidden:
        fixes = [specdirs.command("uninstall", entry.name, p) if specdirs.is_ours(p) else None
                 for p in hidden]
        fix = "; ".join(f"'{cmd}'" if cmd else f"remove {p} yourself" for cmd, p in zip(fixes, hidden))
        return Finding("kernelspec", WARN,
                       f"installed at {found}, which Jupyter uses; {len(hidden)} other cop"
                       f"{'y' if len(hidden) == 1 else 'ies'} of '{entry.name}' hidden by it: "
                       f"{', '.join(str(p) for p in hidden)}.",
                       f"keep one copy: remove the hidden one(s) ({fix}), or update the one Jupyter uses.",
                       entry.name)
    return Finding("kernelspec", OK,
                   f"installed at {found} (if JupyterLab was already open, restart your session to see it).",
                   kernel=entry.name)


def _module_hint(entry: KernelEntry, ctx: Context) -> tuple[Path, str] | None:
    """For a kernel published in a group tree that Jupyter does not see: the tree and the module command
    that shows it (``module use`` only when the tree's modulefiles are not on MODULEPATH yet)."""

    tree = grouptree.tree_of_registry(entry.origin)
    if tree is None or not os.path.isfile(tree.prefix / "share/jupyter/kernels" / entry.name / "kernel.json"):
        return None
    used = os.path.normpath(tree.modulefiles) in {os.path.normpath(p) for p in
                                                  ctx.environ.get("MODULEPATH", "").split(":") if p}
    command = f"module load {tree.module_name}"
    return tree.root, command if used else f"module use {tree.modulefiles} && {command}"


def check_group(registry: Registry, ctx: Context) -> list[Finding]:
    """A registry of a group tree (or one that extends it): is this user in the group, does the tree
    let the group in, is its module loaded?"""

    trees: list[grouptree.GroupTree] = []
    for path in (registry.path, registry.base.path if registry.base else None):
        tree = grouptree.tree_of_registry(path)
        if tree is not None and tree.root not in {t.root for t in trees}:
            trees.append(tree)
    findings = []
    for tree in trees:
        what = f"the group tree {tree.root} of {tree.group}"
        try:
            owner = os.stat(tree.root).st_uid
        except OSError:
            owner = -1
        if tree.gid >= 0 and not access.in_group(tree.gid) and owner != ctx.uid:
            if access.listed_in_group(tree.gid, ctx.user):
                findings.append(Finding("group", FAIL, f"{what}: you were added to {tree.group} after this "
                                        "session started, so it does not count yet.",
                                        "log out and in again (a new JupyterHub session too), or "
                                        f"'newgrp {tree.group}'."))
            else:
                findings.append(Finding("group", FAIL,
                                        f"{what}: you ({ctx.user}) are not in the group {tree.group}.",
                                        f"ask {tree.maintainer} or your PI to add you (on DRAC the PI adds group "
                                        "members in CCDB), then log in again."))
            continue
        closed = _closed_entries(tree)
        if closed:
            shown = ", ".join(str(p) for p in closed[:3]) + (" …" if len(closed) > 3 else "")
            findings.append(Finding("group", WARN, f"{what}: {len(closed)} entries of it are not readable by the "
                                    f"group ({shown}).",
                                    f"{tree.maintainer} can run 'hpc-kernels group init {tree.root}' (it repairs "
                                    "the modes of their files); files of other users: their owners, with chmod."))
            continue
        jupyter = os.path.normpath(tree.prefix / "share" / "jupyter")
        loaded = jupyter in {os.path.normpath(p) for p in ctx.environ.get("JUPYTER_PATH", "").split(":") if p}
        mode = "members may write" if tree.members_write else f"maintained by {tree.maintainer}"
        if loaded:
            findings.append(Finding("group", OK, f"{what} ({mode}): you are in the group, it is readable by the "
                                    f"group, and its module is loaded."))
        else:
            used = os.path.normpath(tree.modulefiles) in {os.path.normpath(p) for p in
                                                          ctx.environ.get("MODULEPATH", "").split(":") if p}
            command = f"module load {tree.module_name}"
            findings.append(Finding("group", WARN, f"{what} ({mode}): its kernels are not on Jupyter's search path "
                                    "here (its module is not loaded).",
                                    command if used else f"module use {tree.modulefiles} && {command} (and the "
                                    "'module use' line in ~/.bashrc, for JupyterHub's Software Modules panel)."))
    return findings


#: A tree with more entries than this is not searched to the end by ``doctor`` (a big venv inside it).
_CLOSED_SCAN_LIMIT = 50000


def _closed_entries(tree: Any) -> list[Path]:
    """Entries of the tree the group cannot read (directories: enter); world-writable ones too."""
    closed: list[Path] = []
    for seen, (path, st) in enumerate(grouptree.entries(tree.root)):
        if seen > _CLOSED_SCAN_LIMIT:
            break
        need = 0o050 if stat.S_ISDIR(st.st_mode) else 0o040
        if st.st_mode & 0o002 or (st.st_gid == tree.gid and st.st_mode & need != need) or \
                (st.st_gid != tree.gid and st.st_mode & (need >> 3) != need >> 3):
            closed.append(path)
    return closed


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_installed(name: str, kdir: Path, entry: KernelEntry | None, ctx: Context) -> list[Finding]:
    """Our installed kernel.json: does its launcher Python exist and import us, does its image exist?"""
    try:
        data, spec = read_kernel_json(str(kdir / "kernel.json"))
    except KernelSpecError as exc:  # hand-edited or half-written: the sentence names the field
        return [Finding("launcher", FAIL, str(exc), f"hpc-kernels install {name}", name)]
    except OSError as exc:
        return [Finding("launcher", FAIL, f"cannot read {kdir / 'kernel.json'}: {exc.strerror or exc}.",
                        f"hpc-kernels install {name}", name)]
    findings: list[Finding] = []
    raw_argv = data.get("argv")
    if not (isinstance(raw_argv, list) and raw_argv and all(isinstance(a, str) for a in raw_argv)):
        # Jupyter itself cannot start such a kernel; nothing below can be probed.
        return [Finding("launcher", FAIL, f"the kernelspec {kdir / 'kernel.json'} is damaged: 'argv' must be "
                        "a list of strings (the launcher's command line).", f"hpc-kernels install {name}", name)]
    argv: list[str] = raw_argv
    python = argv[0]

    closed = [why for why in (group.explain_unreadable(Path(python), os.X_OK) if python else None,
                              *(group.explain_unreadable(Path(a)) for a in _launcher_prefix(argv)[1:]
                                if os.path.isabs(a))) if why]
    if closed:
        findings.append(Finding("launcher", FAIL, f"kernelspec {kdir} starts hpc-kernels' launcher "
                                f"({' '.join(_launcher_prefix(argv))}), which you cannot run: {closed[0]}",
                                "the maintainer should install hpc-kernels where the group can read it (a venv in "
                                "the group tree, then 'hpc-kernels group init' on the tree and 'hpc-kernels install' "
                                "again).", name))
    elif not (python and os.path.isfile(python) and os.access(python, os.X_OK)):
        findings.append(Finding("launcher", FAIL,
                                f"kernelspec {kdir} starts '{python}', which does not exist any more "
                                "(was the virtualenv that installed it removed?).",
                                f"reinstall hpc-kernels, then 'hpc-kernels install {name}'.", name))
    else:
        try:
            # Start the launcher exactly as the kernel does (python -I -S .../launch.py, or the older
            # python -I -m hpc_kernels.launch) but without its two arguments: once it has imported what
            # it needs it prints its usage and exits 2; anything else is the reason a kernel would not start.
            probe = proc.run(_launcher_prefix(argv), check=False, env=ctx.environ, timeout=ctx.probe_timeout)
            problem = "" if probe.returncode == 2 and "usage:" in probe.stderr else (
                _last_line(probe.stderr) or f"exit code {probe.returncode}")
        except ToolError as exc:
            problem = str(exc)
        if problem:
            findings.append(Finding("launcher", FAIL,
                                    f"the launcher ({' '.join(_launcher_prefix(argv))}) does not start: "
                                    f"{problem}",
                                    f"reinstall hpc-kernels into that environment, or 'hpc-kernels install "
                                    f"{name}' from the one you use now.", name))
        else:
            findings.append(Finding("launcher", OK, f"launcher {' '.join(_launcher_prefix(argv))} starts.",
                                    kernel=name))
    if spec.runtime == Runtime.APPTAINER and not os.path.exists(spec.image) and (
            entry is None or spec.image != str(entry.image)) and group.explain_unreadable(Path(spec.image)) is None:
        findings.append(Finding("launcher", FAIL,
                                f"kernelspec {kdir} points at the image {spec.image}, which does not exist.",
                                f"'hpc-kernels install {name}' again (the registry's image path changed), or "
                                f"'hpc-kernels uninstall {name}' if the kernel is gone.", name))
    if entry is not None:
        wanted = kernelspec.launch_spec(entry)
        drift = [f for f in ("image", "command", "binds", "env", "pass_env", "gpu", "mode", "runtime_args")
                 if getattr(spec, f) != getattr(wanted, f)]
        if drift:
            findings.append(Finding("launcher", WARN,
                                    f"the installed kernelspec differs from the registry "
                                    f"({', '.join(drift)}).",
                                    f"hpc-kernels install {name}", name))
    return findings






