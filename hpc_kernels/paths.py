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
    from pathlib import Path

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


def hostname() -> str:
    """The short host name (what Slurm and Apptainer call the node; ``gethostname()`` is ``uname``'s)."""
    return os.uname().nodename.split(".")[0]


def default_images_dir() -> Path:
    """``$HPC_KERNELS_IMAGES`` or ``<data dir>/images``."""
    override = os.environ.get("HPC_KERNELS_IMAGES")
    return _path(override) if override else data_dir() / "images"
