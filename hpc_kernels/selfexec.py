"""Starting our own helper processes (watchers, instance reapers) cheaply and isolated."""

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


def spawn_detached(argv: list[str], log: str) -> None:
    """Run ``argv`` fully detached, its output appended to ``log``: a double fork and a new session.

    Its own session keeps it out of the caller's process group (jupyter_client kills a kernel's whole
    group) and session; the double fork makes it nobody's child (the caller may ``exec`` into a program
    that would never reap it). Costs the caller one ``fork`` and a wait for the short-lived middle child;
    no ``subprocess`` import.
    """
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # per-user state: private
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.closerange(3, 1024)  # nothing of the caller's (sockets, pipes) stays open in it
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        os.waitpid(pid, 0)
    finally:
        os.close(out)


def exec_runtime(argv: list[str], env: dict[str, str], warnings: list[str]) -> int:
    """The launcher's last step: the warnings to Jupyter's log, then ``execve`` the runtime, which becomes
    the kernel's process (Jupyter's signals and kills reach it directly). Returns only if exec fails."""
    for warning in warnings:
        print(f"hpc-kernels: warning: {warning}", file=sys.stderr)
    os.execve(argv[0], argv, env)
    return 1  # pragma: no cover - execve does not return
