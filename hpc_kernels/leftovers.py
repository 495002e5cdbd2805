"""What a gc sweeper reports: one leftover it found, and what it did about it. Low in the layers, so that
every runtime's sweeper can say it without importing ``gc`` (which goes through the runtime table)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Leftover:
    """One leftover a sweeper found, and what it did (or would do, with ``dry_run``)."""

    sweeper: str
    target: str
    action: str
    reason: str


#: The runtimes a kernel of this user uses, during one ``gc`` run (computed once by gc, read by every
#: sweeper); unset, every runtime counts as in use.
_IN_USE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("hpck_gc_in_use", default=None)


@contextlib.contextmanager
def runtimes_in_use(runtimes: frozenset[str]) -> Iterator[None]:
    """Within this block, :func:`in_use` answers from ``runtimes`` (``hpc_kernels.gc.sweep`` sets it)."""
    token = _IN_USE.set(runtimes)
    try:
        yield
    finally:
        _IN_USE.reset(token)


def in_use(runtime: str) -> bool:
    """May a sweeper run ``runtime`` (apptainer, docker, podman)? Only when a kernel uses it.

    Asking Podman whether containers of ours exist starts its machinery (``~/.config/cni``, a
    ``/run/user/UID`` tree, a ``catatonit`` process left running) on a cluster where every kernel is
    Apptainer's: gc works out once which runtimes our kernels use (:func:`runtimes_in_use`).
    """
    known = _IN_USE.get()
    return known is None or runtime in known
