"""``hpc-kernels gc``: a list of sweepers, each finding (and removing) one kind of leftover.

A sweeper is ``fn(dry_run: bool) -> list[Finding]``, named in :data:`SWEEPERS` as
``"module:function"`` so that the list costs no import until ``gc`` runs; another runtime adds its
own sweeper by appending one entry here.

A sweeper runs a container program only when :func:`in_use` says a kernel uses it: asking Podman
whether containers of ours exist starts its machinery (``~/.config/cni``, a ``/run/user/UID`` tree, a
``catatonit`` process left running) on a cluster where every kernel is Apptainer's.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One leftover a sweeper found, and what it did (or would do, with ``dry_run``)."""

    sweeper: str
    target: str
    action: str
    reason: str


Sweeper = Callable[[bool], list[Finding]]

#: Run in this order: instance state first, so processes of instances it just forgot count as orphans.
SWEEPERS: tuple[str, ...] = (
    "hpc_kernels.instances:sweep_state",
    "hpc_kernels.instances:sweep_orphans",
    "hpc_kernels.watcher:sweep",
    "hpc_kernels.gc:sweep_kernelspecs",
    "hpc_kernels.containers:sweep",
    "hpc_kernels.jobkernel:sweep",
    "hpc_kernels.build.temp:sweep",
)


def resolve(name: str) -> Sweeper:
    """The sweeper function named ``module:function``."""
    module, _, function = name.partition(":")
    fn: Sweeper = getattr(importlib.import_module(module), function)
    return fn


#: The runtimes in use during one :func:`sweep` (computed once, read by every sweeper).
_IN_USE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("hpck_gc_in_use", default=None)


def sweep(dry_run: bool = False, sweepers: tuple[str, ...] = SWEEPERS, registry: str | None = None) -> list[Finding]:
    """Run every sweeper; their findings, in order. ``registry`` (``--registry``) adds its kernels'
    runtimes to those in use (see :func:`runtimes_in_use`)."""
    token = _IN_USE.set(runtimes_in_use(registry))
    try:
        found: list[Finding] = []
        for name in sweepers:
            found += resolve(name)(dry_run)
        return found
    finally:
        _IN_USE.reset(token)


def in_use(runtime: str) -> bool:
    """May a sweeper run ``runtime`` (apptainer, docker, podman)? Only when a kernel uses it."""
    known = _IN_USE.get()
    return runtime in (known if known is not None else runtimes_in_use())


def runtimes_in_use(registry: str | None = None) -> frozenset[str]:
    """The runtimes a kernel of this user uses: named by an installed kernelspec of ours, by the registry
    (``registry``, else the usual search; a registry that cannot be loaded is ignored unless named), or
    by records of ours (instance state; the mark a Docker/Podman kernel leaves when it starts)."""
    from hpc_kernels import containers, instances, kernelspec
    from hpc_kernels import registry as registry_module
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.launchspec import read_kernel_json

    found: set[str] = set()
    for kdir in kernelspec.search_dirs():
        try:
            children = sorted(kdir.iterdir())
        except OSError:  # missing, or a directory this user may not read (a group's)
            continue
        for child in children:
            if kernelspec.is_ours(child):
                try:
                    found.add(read_kernel_json(str(child / "kernel.json"))[1].runtime)
                except (OSError, ValueError):
                    continue  # damaged: sweep_kernelspecs reports it
    try:
        found.update(entry.runtime for entry in registry_module.load(registry).kernels)
    except HpcKernelsError:
        if registry is not None:
            raise
    if instances.root().is_dir():
        found.add("apptainer")
    found.update(containers.runtimes_marked())
    return frozenset(found)


def sweep_kernelspecs(dry_run: bool = False) -> list[Finding]:
    """Remove our Apptainer kernelspecs whose image file no longer exists (others are not ours to judge)."""
    import os

    from hpc_kernels import kernelspec
    from hpc_kernels.fsutil import remove_tree
    from hpc_kernels.launchspec import KernelSpecError, read_kernel_json

    found: list[Finding] = []
    for name, kdir in sorted(kernelspec.installed_ours().items()):
        try:
            _data, spec = read_kernel_json(str(kdir / "kernel.json"))
        except KernelSpecError as exc:
            # Damaged (hand-edited, half-written): say so and leave it; 'hpc-kernels install' repairs it.
            found.append(Finding("kernelspecs", name, "left alone", str(exc)))
            continue
        except OSError as exc:
            found.append(Finding("kernelspecs", name, "left alone",
                                 f"cannot read {kdir / 'kernel.json'}: {exc.strerror or exc}"))
            continue
        if spec.runtime != "apptainer" or os.path.exists(spec.image):
            continue
        from pathlib import Path

        from hpc_kernels import access

        if access.blocker(Path(spec.image)) is not None:  # it may well exist: we may not look (a group's)
            found.append(Finding("kernelspecs", name, "left alone",
                                 f"cannot tell whether its image {spec.image} exists: a directory on its way is "
                                 "closed to you"))
            continue
        if not os.access(kdir.parent, os.W_OK):
            found.append(Finding("kernelspecs", name, "left alone",
                                 f"image {spec.image} is gone, but {kdir} is not writable"))
            continue
        found.append(Finding("kernelspecs", name, "removed", f"its image {spec.image} is gone"))
        if not dry_run and kernelspec.is_ours(kdir):
            remove_tree(kdir)
    return found
