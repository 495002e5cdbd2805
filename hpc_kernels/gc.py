"""``hpc-kernels gc``: a list of sweepers, each finding (and removing) one kind of leftover.

A sweeper is ``fn(dry_run: bool) -> list[Leftover]``, named as ``"module:function"`` so that the list
costs no import until it runs: each runtime of :mod:`hpc_kernels.runtimes.table` names its own
(``Runtime.sweepers``), and :data:`SWEEPERS` adds those of no runtime (kernelspecs, build temporaries).

A sweeper runs a container program only when :func:`hpc_kernels.leftovers.in_use` says a kernel uses it: asking Podman
whether containers of ours exist starts its machinery (``~/.config/cni``, a ``/run/user/UID`` tree, a
``catatonit`` process left running) on a cluster where every kernel is Apptainer's.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from hpc_kernels import access, leftovers, specdirs
from hpc_kernels import registry as registry_module
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import remove_tree
from hpc_kernels.launchspec import KernelSpecError, read_kernel_json
from hpc_kernels.leftovers import Leftover
from hpc_kernels.runtimes import table

Sweeper = Callable[[bool], list[Leftover]]

#: Run in this order: the runtimes' own (Apptainer's instance state first, so processes of instances it
#: just forgot count as orphans), then those of no runtime.
SWEEPERS: tuple[str, ...] = (
    *table.sweepers(),
    "hpc_kernels.gc:sweep_kernelspecs",
    "hpc_kernels.build.temp:sweep",
)


def resolve(name: str) -> Sweeper:
    """The sweeper function named ``module:function``."""
    module, _, function = name.partition(":")
    fn: Sweeper = getattr(importlib.import_module(module), function)
    return fn


def sweep(dry_run: bool = False, sweepers: tuple[str, ...] = SWEEPERS, registry: str | None = None) -> list[Leftover]:
    """Run every sweeper; their findings, in order. ``registry`` (``--registry``) adds its kernels'
    runtimes to those in use (see :func:`runtimes_in_use`)."""
    with leftovers.runtimes_in_use(runtimes_in_use(registry)):
        found: list[Leftover] = []
        for name in sweepers:
            found += resolve(name)(dry_run)
        return found


def runtimes_in_use(registry: str | None = None) -> frozenset[str]:
    """The runtimes a kernel of this user uses: named by an installed kernelspec of ours, by the registry
    (``registry``, else the usual search; a registry that cannot be loaded is ignored unless named), or
    by records of ours (instance state; the mark a Docker/Podman kernel leaves when it starts)."""
    found: set[str] = set()
    for kdir in specdirs.search_dirs():
        try:
            children = sorted(kdir.iterdir())
        except OSError:  # missing, or a directory this user may not read (a group's)
            continue
        for child in children:
            if specdirs.is_ours(child):
                try:
                    found.add(read_kernel_json(str(child / "kernel.json"))[1].runtime)
                except (OSError, ValueError):
                    continue  # damaged: sweep_kernelspecs reports it
    try:
        found.update(entry.runtime for entry in registry_module.load(registry).kernels)
    except HpcKernelsError:
        if registry is not None:
            raise
    found.update(runtime.name for runtime in table.every() if runtime.has_records())
    return frozenset(found)


def sweep_kernelspecs(dry_run: bool = False) -> list[Leftover]:
    """Remove our kernelspecs whose image file no longer exists (Apptainer's: a container runtime's images
    are not ours to judge)."""
    found: list[Leftover] = []
    for name, kdir in sorted(specdirs.installed_ours().items()):
        try:
            _data, spec = read_kernel_json(str(kdir / "kernel.json"))
        except KernelSpecError as exc:
            # Damaged (hand-edited, half-written): say so and leave it; 'hpc-kernels install' repairs it.
            found.append(Leftover("kernelspecs", name, "left alone", str(exc)))
            continue
        except OSError as exc:
            found.append(Leftover("kernelspecs", name, "left alone",
                                 f"cannot read {kdir / 'kernel.json'}: {exc.strerror or exc}"))
            continue
        if not table.get(spec.runtime).features.image_is_file or os.path.exists(spec.image):
            continue
        if access.blocker(Path(spec.image)) is not None:  # it may well exist: we may not look (a group's)
            found.append(Leftover("kernelspecs", name, "left alone",
                                 f"cannot tell whether its image {spec.image} exists: a directory on its way is "
                                 "closed to you"))
            continue
        if not os.access(kdir.parent, os.W_OK):
            found.append(Leftover("kernelspecs", name, "left alone",
                                 f"image {spec.image} is gone, but {kdir} is not writable"))
            continue
        found.append(Leftover("kernelspecs", name, "removed", f"its image {spec.image} is gone"))
        if not dry_run and specdirs.is_ours(kdir):
            remove_tree(kdir)
    return found
