"""Where hpc-kernels keeps its files. Every location honours an environment override (tests use them).

Import-light (the launcher records each exec kernel under :func:`host_state_path`): ``pathlib`` and
``socket`` cost ~7 ms under ``python -S``, so the ``*_path`` functions are plain strings, the ``Path``
ones import pathlib when called, and the host name comes from ``uname``.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

APP = "hpc-kernels"


def _xdg(var: str, fallback: str) -> str:
    value = os.environ.get(var)
    return value if value else os.path.join(os.path.expanduser("~"), fallback)


def _path(text: str) -> Path:
    from pathlib import Path  # why: not at module level, the launcher imports this module on every start

    return Path(text)


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/hpc-kernels``: the user's default registry lives here."""
    return _path(os.path.join(_xdg("XDG_CONFIG_HOME", ".config"), APP))


def data_dir() -> Path:
    """``$HPC_KERNELS_DATA`` or ``$XDG_DATA_HOME/hpc-kernels``: default home of built images."""
    override = os.environ.get("HPC_KERNELS_DATA")
    return _path(override or os.path.join(_xdg("XDG_DATA_HOME", ".local/share"), APP))


def state_path() -> str:
    """``$HPC_KERNELS_STATE`` or ``$XDG_STATE_HOME/hpc-kernels``, as a string."""
    override = os.environ.get("HPC_KERNELS_STATE")
    return override or os.path.join(_xdg("XDG_STATE_HOME", ".local/state"), APP)


def state_dir() -> Path:
    """``$HPC_KERNELS_STATE`` or ``$XDG_STATE_HOME/hpc-kernels``: logs, locks, instance records."""
    return _path(state_path())


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hpc-kernels``: throw-away helpers (the ``singularity`` shim for spython)."""
    return _path(os.path.join(_xdg("XDG_CACHE_HOME", ".cache"), APP))


def log_path() -> str:
    """Directory of logs, as a string."""
    return os.path.join(state_path(), "logs")


def log_dir() -> Path:
    """Directory of build logs (and of our helper processes' logs)."""
    return _path(log_path())


def host_state_path() -> str:
    """:func:`host_state_dir` as a string."""
    return os.path.join(state_path(), "hosts", hostname())


def host_state_dir() -> Path:
    """Per-host state (instances live on one node only, like Apptainer's own instance records)."""
    return _path(host_state_path())


def private(path: Path) -> Path:
    """``path``, a directory under :func:`state_dir` or :func:`cache_dir`, created 0700 with every
    directory from that top down to it private (ones created 0755 by older versions are tightened):
    per-user state no other user can read, or lock to stall our kernels."""
    from hpc_kernels.fsutil import private_dir  # why: the launcher imports this module; fsutil is not for it

    for top in (state_dir(), cache_dir()):
        if path == top or top in path.parents:
            return private_dir(path, top)
    return private_dir(path)


def hostname() -> str:
    """The short host name (what Slurm and Apptainer call the node; ``gethostname()`` is ``uname``'s)."""
    return os.uname().nodename.split(".")[0]


def default_images_dir() -> Path:
    """``$HPC_KERNELS_IMAGES`` or ``<data dir>/images``."""
    override = os.environ.get("HPC_KERNELS_IMAGES")
    return _path(override) if override else data_dir() / "images"


def unwritable_hint(exc: OSError) -> str | None:
    """When ``exc`` failed on a path inside one of our directories (state, cache, data): one sentence
    naming that directory as the cause, with the variable that moves it; None otherwise.

    With ``$HOME`` read-only (a full or broken home quota), a kernel fails on the state directory; saying
    "cannot write FILE" alone hides that the fix is the directory, or ``HPC_KERNELS_STATE``.
    """
    from pathlib import Path  # why: not at module level, the launcher imports this module on every start

    if not exc.filename:
        return None
    path = Path(os.fsdecode(exc.filename)).absolute()
    why = exc.strerror or str(exc)
    for label, directory, moves in (
        ("state directory", state_dir(), "HPC_KERNELS_STATE (or XDG_STATE_HOME)"),
        ("cache directory", cache_dir(), "XDG_CACHE_HOME"),
        ("data directory", data_dir(), "HPC_KERNELS_DATA (or XDG_DATA_HOME)"),
    ):
        if path == directory.absolute() or directory.absolute() in path.parents:
            return (f"hpc-kernels cannot write its {label} {directory} ({why}: {path}); make it writable "
                    f"(is your home full or read-only?), or set {moves} to a writable directory, in the "
                    "environment Jupyter starts from and in your shell alike.")
    return None
