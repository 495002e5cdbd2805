"""Command-line interface: parses arguments, calls the library, renders results.

The only module that prints or exits. Errors → exit 1, usage → 2, Ctrl-C → 130.
Imports are lazy so that ``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hpc_kernels import __version__

#: Subcommands, each a module in hpc_kernels.commands with HELP, add_arguments() and run().
COMMANDS = (
    "build",
    "install",
    "uninstall",
    "list",
    "show",
    "run",
    "module",
    "group",
    "jobs",
    "instances",
    "stop",
    "gc",
    "doctor",
)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", metavar="PATH",
        help="the kernels.yaml to use (default: $HPC_KERNELS_REGISTRY, ./kernels.yaml, "
        "~/.config/hpc-kernels/kernels.yaml)",
    )
    parser = argparse.ArgumentParser(
        prog="hpc-kernels",
        description="Jupyter kernels in Apptainer (and Docker/Podman) containers, for HPC clusters.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"hpc_kernels.commands.{name.replace('-', '_')}")
        sp = sub.add_parser(name, parents=[common], help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    from hpc_kernels.errors import HpcKernelsError, UsageError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _error(str(exc))
        return 2
    except HpcKernelsError as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted.")
        return 130
    except BrokenPipeError:  # `hpc-kernels list | head`
        return 0
    except OSError as exc:
        # A filesystem problem (permissions, quota, read-only /project...): one sentence, no traceback;
        # in one of our own directories, that directory and how to move it.
        from hpc_kernels.paths import unwritable_hint

        where = f" ({exc.filename})" if exc.filename else ""
        _error(unwritable_hint(exc) or f"{exc.strerror or exc}{where}.")
        return 1


def _error(message: str) -> None:
    print(f"hpc-kernels: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
