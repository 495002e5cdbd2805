"""Starting our own helper processes (container watchers, instance reapers) cheaply and isolated."""

from __future__ import annotations

import os
import sys

#: The directory that holds the hpc_kernels package (site-packages, or a source tree).
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_argv(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` the way the launcher runs: ``-I`` (no PYTHONPATH or user
    site of the server's environment can shadow us) and ``-S`` (no ``site``: most of an interpreter's
    start-up), with this package's parent put on sys.path by hand."""
    code = (f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); import runpy; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-I", "-S", "-c", code, *args]
