"""Rendering helpers shared by the commands (rich is imported lazily).

Text that comes from users, files or programs (names, paths, log lines) is data: it goes into our
markup strings through :func:`esc`, into tables as :class:`rich.text.Text` (:func:`cell`), or is
printed with ``markup=False``. Emoji codes are off, so ``:smile:`` in a name stays as written.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A rich console (stdout, or stderr for progress and notes)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)


def esc(value: object) -> str:
    """``str(value)`` made safe to put into a rich markup string: it prints as written."""
    from rich.markup import escape

    return escape(str(value))


def cell(value: object, style: str = "") -> Any:
    """A table cell that shows ``value`` as written (a plain string cell would be read as markup)."""
    from rich.text import Text

    return Text(str(value), style=style)


def print_json(data: Any) -> None:
    """Machine-readable output for scripts."""
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def note(message: str) -> None:
    """A one-line note on stderr (keeps stdout clean for tables and JSON); ``message`` is markup:
    pass values through :func:`esc`."""
    console(stderr=True).print(message)


def add_selection(parser: Any, verb: str) -> None:
    """``NAME…`` or ``--all``."""
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"kernels to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every kernel in the registry")


def selected(registry: Any, args: Any) -> list[Any]:
    """The registry entries the user selected; a usage error when nothing was named."""
    from hpc_kernels.errors import UsageError

    if not args.names and not args.all:
        raise UsageError("name at least one kernel, or pass --all.")
    if args.names and args.all:
        raise UsageError("give kernel names or --all, not both.")
    return list(registry.select(args.names, args.all))
