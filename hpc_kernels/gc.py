"""``hpc-kernels gc``: a list of sweepers, each finding (and removing) one kind of leftover.

A sweeper is ``fn(dry_run: bool) -> list[Finding]``, named in :data:`SWEEPERS` as
``"module:function"`` so that the list costs no import until ``gc`` runs; another runtime adds its
own sweeper by appending one entry here.
"""

from __future__ import annotations

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
)


def resolve(name: str) -> Sweeper:
    """The sweeper function named ``module:function``."""
    module, _, function = name.partition(":")
    fn: Sweeper = getattr(importlib.import_module(module), function)
    return fn


def sweep(dry_run: bool = False, sweepers: tuple[str, ...] = SWEEPERS) -> list[Finding]:
    """Run every sweeper; their findings, in order."""
    found: list[Finding] = []
    for name in sweepers:
        found += resolve(name)(dry_run)
    return found


def sweep_kernelspecs(dry_run: bool = False) -> list[Finding]:
    """Remove our Apptainer kernelspecs whose image file no longer exists (others are not ours to judge)."""
    import os
    import shutil

    from hpc_kernels import kernelspec
    from hpc_kernels.launchspec import read_kernel_json

    found: list[Finding] = []
    for name, kdir in sorted(kernelspec.installed_ours().items()):
        try:
            _data, spec = read_kernel_json(str(kdir / "kernel.json"))
        except (OSError, ValueError):
            continue
        if spec.runtime != "apptainer" or os.path.exists(spec.image):
            continue
        if not os.access(kdir.parent, os.W_OK):
            found.append(Finding("kernelspecs", name, "left alone",
                                 f"image {spec.image} is gone, but {kdir} is not writable"))
            continue
        found.append(Finding("kernelspecs", name, "removed", f"its image {spec.image} is gone"))
        if not dry_run and kernelspec.is_ours(kdir):
            shutil.rmtree(kdir)
    return found
