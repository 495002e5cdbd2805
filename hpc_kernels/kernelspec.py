"""Jupyter kernelspecs as data, in the directories jupyter_core names, written and removed atomically.

Our kernel.json carries ``metadata.hpc_kernels`` (the launch spec): that is both the launcher's
input and the marker that lets us refuse to touch kernelspecs we did not write. A kernelspec directory
is written complete beside its place and renamed into it, so a full disk never leaves half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from hpc_kernels import __version__, group, paths, procfs
from hpc_kernels.build import imagecheck
from hpc_kernels.errors import HpcKernelsError, NotOursError
from hpc_kernels.fsutil import Share, make_dirs, remove_tree, share_for
from hpc_kernels.launchspec import MARKER
from hpc_kernels.model import KernelEntry, LaunchSpec
from hpc_kernels.runtimes import table
from hpc_kernels.specdirs import (
    LEFTOVER_AGE,
    LOGO_FILES,
    RETIRED_PREFIX,
    STAGING_PREFIX,
    Target,
    command,
    copies,
    half_written,
    is_ours,
)

#: The launcher script, beside this module in the package (kernelspec does not import it: the launcher
#: goes through the runtime table, which is below it).
LAUNCHER = Path(__file__).with_name("launch.py")


def launch_spec(entry: KernelEntry, registry: Path | None = None) -> LaunchSpec:
    """The launcher's input for ``entry`` (its command with the Python found in the image, when the registry
    gives none: :func:`hpc_kernels.build.imagecheck.kernel_command`)."""
    return entry.launch_spec(command=imagecheck.kernel_command(entry), registry=str(registry) if registry else "",
                             runtime_hint=_runtime_hint(entry.runtime))


def _runtime_hint(runtime: str) -> str:
    """The runtime binary visible now, recorded as the launcher's last resort (see LaunchSpec)."""
    for program in table.get(runtime).features.programs or (runtime,):
        found = shutil.which(program)
        if found:
            return found
    return ""


def display_name(entry: KernelEntry) -> str:
    """The name in the kernel menu: a job kernel's shows its resources (``Python (torch) [job: 1 GPU, 32G,
    2:00:00]``), so choosing it is choosing what it asks Slurm for."""
    if entry.job is None:
        return entry.display_name
    return f"{entry.display_name} [job: {entry.job.summary()}]"


def launcher_argv(python: str = sys.executable) -> list[str]:
    """How a kernelspec starts the launcher: ``python -I -S /abs/path/of/hpc_kernels/launch.py``.

    -I: the launcher ignores PYTHONPATH/PYTHONHOME and user site-packages of the server's environment, so a
    module-loaded Python stack cannot shadow or break it. -S: no ``site`` (.pth files, ~30 ms of every kernel
    start); the script puts its own package's parent directory on sys.path, so it needs nothing else.
    """
    return [python, "-I", "-S", str(LAUNCHER.absolute())]


def kernel_json(entry: KernelEntry, spec_file: Path, registry: Path | None = None,
                python: str = sys.executable) -> dict[str, Any]:
    """kernel.json for ``entry``, whose own path will be ``spec_file``.

    The launcher gets ``{connection_file}`` as an argument of its own (some clients do not
    substitute it inside ``src:dst``) and the path of this very file to read its spec from.
    """
    meta = launch_spec(entry, registry).to_json()
    meta["installed_by"] = f"hpc-kernels {__version__}"
    return {
        "argv": [*launcher_argv(python), str(spec_file), "{connection_file}"],
        "display_name": display_name(entry),
        "language": entry.language,
        "interrupt_mode": entry.interrupt_mode,
        "metadata": {MARKER: meta, "debugger": False},
    }


def install(entry: KernelEntry, target: Target, registry: Path | None = None,
            on_note: Callable[[str], None] | None = None) -> Path:
    """Install ``entry``'s kernelspec atomically: the whole directory is written beside its place and
    renamed into it, so Jupyter never sees a half-written one, whatever fails (a full disk, a quota).

    An image whose Python has not been found yet (given as is, or built by an older hpc-kernels) is looked
    into first (:func:`hpc_kernels.build.imagecheck.probe_for_install`): one that cannot start its kernel is
    refused with the fix, before anything is written; ``on_note`` hears when the image could not be checked.
    """
    kdir = target.kernels_dir()
    dest = kdir / entry.name

    group.ensure_writable(kdir, f"install the kernelspec '{entry.name}' in {kdir}",
                          _own_copy_hint(target, "install"))
    _refuse_unreadable(dest, "replace")
    if os.path.lexists(dest) and not (is_ours(dest) or half_written(dest)):
        raise NotOursError(
            f"a kernelspec named '{entry.name}' already exists at {dest} and was not written by "
            "hpc-kernels; remove it yourself or rename the kernel in the registry."
        )
    _found, note = imagecheck.probe_for_install(entry)
    if note and on_note:
        on_note(note)
    data = kernel_json(entry, dest / "kernel.json", registry)
    try:
        # In a group directory (setgid /project): the group's modes, whatever the umask (fsutil.Share).
        share = share_for(kdir)
        make_dirs(kdir, share)
        remove_leftovers(kdir, entry.name)
        staging = _temporary_name(kdir, STAGING_PREFIX, entry.name)
        staging.mkdir()
        try:
            if share is not None:
                share.own(staging)
                os.chmod(staging, share.dir_mode())
            # kernel.json under another name until the directory is complete: Jupyter lists any
            # directory with a kernel.json, even ours in the making.
            _write_new(staging / "kernel.json.part", (json.dumps(data, indent=1) + "\n").encode(), share)
            _copy_logos(staging, share)
            os.replace(staging / "kernel.json.part", staging / "kernel.json")
        except BaseException:
            _discard(staging)
            raise
    except OSError as exc:
        raise HpcKernelsError(_write_failure(entry.name, kdir, exc)) from None
    try:
        _swap_in(staging, dest)
    except BaseException:
        _discard(staging)
        raise
    return dest


def _write_failure(name: str, kdir: Path, exc: OSError) -> str:
    """One sentence for a kernelspec that could not be written (nothing was changed)."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = ("free some space (on DRAC clusters 'diskusage_report' shows your quotas), then run "
               f"'hpc-kernels install {name}' again")
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "install where you can write: --user (the default) or --prefix DIR"
    else:
        fix = f"fix that, then run 'hpc-kernels install {name}' again"
    return (f"could not write the kernelspec '{name}' in {kdir}: {exc.strerror or exc}{where}; nothing was "
            f"changed there: {fix}.")


def _temporary_name(kdir: Path, prefix: str, name: str) -> Path:
    return kdir / f"{prefix}{name}@{paths.hostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def _write_new(path: Path, data: bytes, share: Share | None = None) -> None:
    """Create ``path`` with ``data``, flushed to disk (a full disk fails here, not later); in a group
    directory with the group's mode (``share``), elsewhere as the umask says."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if share is not None:
            os.fchmod(fd, share.file_mode(0o644))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if share is not None:
        share.own(path)


def _own_copy_hint(target: Target, verb: str) -> str:
    return "" if target.user else f"pass --user to {verb} your own copy"


def _refuse_unreadable(dest: Path, verb: str) -> None:
    """A kernelspec this user cannot read is not "someone else's": say what stops them instead."""
    if not os.path.lexists(dest):
        return
    why = group.explain_unreadable(dest / "kernel.json") if os.path.lexists(dest / "kernel.json") or \
        not os.access(dest, os.R_OK | os.X_OK) else None
    if why:
        raise HpcKernelsError(f"cannot {verb} the kernelspec {dest}: {why}")


def _swap_in(staging: Path, dest: Path) -> None:
    """Rename the complete ``staging`` directory to ``dest``, replacing our earlier one.

    The earlier one is renamed aside and removed afterwards; if it cannot be removed (a kernelspec
    another user wrote in a shared prefix), everything is put back as it was and the error names the
    file in ``dest``: no copy is left where Jupyter would list it under a temporary name.
    """
    if not os.path.lexists(dest):
        os.rename(staging, dest)
        return
    retired = _temporary_name(dest.parent, RETIRED_PREFIX, dest.name)
    os.rename(dest, retired)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(retired, dest)
        raise
    try:
        if retired.is_symlink():  # a kernelspec that was a link: the link goes, not what it points to
            retired.unlink()
        else:
            remove_tree(retired)  # its errors name the full path
    except OSError as exc:
        os.rename(dest, staging)
        os.rename(retired, dest)
        where = os.fsdecode(exc.filename) if exc.filename else ""
        if where.startswith(str(retired)):
            where = str(dest) + where[len(str(retired)):]
        raise type(exc)(exc.errno, exc.strerror, where or str(dest)) from None


def _discard(path: Path) -> None:
    """Remove one of our temporaries, if it is there, its kernel.json first (so Jupyter stops listing it
    even if the rest of the removal fails); errors are left for :func:`remove_leftovers`."""
    if path.is_symlink():  # a kernelspec that was a link: the link is ours to remove, not its target
        with contextlib.suppress(OSError):
            path.unlink()
        return
    with contextlib.suppress(OSError):
        (path / "kernel.json").unlink()
    shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(kdir: Path, name: str) -> list[Path]:
    """Remove the temporaries that an install or uninstall of kernel ``name`` in ``kdir`` left behind
    when it was killed: those of a process of this node that is gone, and old ones of other nodes."""
    removed = []
    for prefix in (STAGING_PREFIX, RETIRED_PREFIX):
        for path in kdir.glob(f"{prefix}{name}@*"):
            owner, _, rest = path.name[len(prefix) + len(name) + 1:].partition(".")
            pid_text = rest.partition(".")[0]
            try:
                age = time.time() - path.lstat().st_mtime
            except OSError:
                continue
            mine = owner == paths.hostname() and pid_text.isdigit()
            if (mine and not procfs.alive(int(pid_text))) or (not mine and age > LEFTOVER_AGE):
                _discard(path)
                removed.append(path)
    return removed


def _copy_logos(dest: Path, share: Share | None = None) -> None:
    """Put our logo files (package data in ``hpc_kernels/resources``) into ``dest``."""
    resources = files("hpc_kernels").joinpath("resources")
    for name in LOGO_FILES:
        _write_new(dest / name, resources.joinpath(name).read_bytes(), share)


def uninstall(name: str, target: Target) -> Path:
    """Remove our kernelspec ``name`` from ``target`` (also what an interrupted install of ours left, and
    its leftover temporaries); refuse one we did not write."""
    kdir = target.kernels_dir()
    dest = kdir / name
    if os.path.lexists(dest):
        group.ensure_writable(kdir, f"remove the kernelspec '{name}' from {kdir}", _own_copy_hint(target, "remove"))
        _refuse_unreadable(dest, "remove")
    if kdir.is_dir() and os.access(kdir, os.W_OK | os.X_OK):
        remove_leftovers(kdir, name)
    if not os.path.lexists(dest):
        elsewhere = [p for p in copies(name) if is_ours(p)]
        hint = ""
        if elsewhere:
            reach = command("uninstall", name, elsewhere[0])
            hint = (f"; Jupyter finds one in {elsewhere[0]}: "
                    + (f"'{reach}' removes it" if reach else "remove it yourself"))
        raise HpcKernelsError(f"no kernelspec named '{name}' in {dest.parent}{hint}.")
    if not (is_ours(dest) or half_written(dest)):
        raise NotOursError(f"the kernelspec at {dest} was not written by hpc-kernels; leaving it alone.")
    remove_tree(dest)
    return dest
