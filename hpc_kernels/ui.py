"""Rendering helpers shared by the commands (rich is imported lazily).

Text that comes from users, files or programs (names, paths, log lines) is data: it goes into our
markup strings through :func:`esc`, into tables as :class:`rich.text.Text` (:func:`cell`), or is
printed with ``markup=False``. Emoji codes are off, so ``:smile:`` in a name stays as written.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

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


def plain_note(message: str) -> None:
    """A note on stderr printed as plain text: names and paths in it are never read as rich markup."""
    console(stderr=True).print(message, markup=False)


def say(message: str, mark: str = "", style: str = "", indent: str = "", stderr: bool = True) -> None:
    """One line: an optional coloured mark (``✓``, ``!``, ``note:``), then ``message`` as plain text (never markup)."""
    from rich.text import Text

    text = Text(indent)
    if mark:
        text.append(mark, style=style)
        text.append(" ")
    text.append(message)
    console(stderr=stderr).print(text)


def tilde(path: str | Path) -> str:
    """``path`` for people to read: the home directory shown as ``~`` (``--json`` keeps full paths)."""
    text = str(path)
    home = os.path.expanduser("~").rstrip("/")
    if not home or home == "~":  # no $HOME, or $HOME is "/": nothing to shorten
        return text
    if text == home:
        return "~"
    if text.startswith(home + "/"):
        return "~" + text[len(home):]
    return text


def add_selection(parser: Any, verb: str) -> None:
    """``NAME…`` or ``--all``."""
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"kernels to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every kernel in the registry")


def selected(registry: Any, args: Any) -> list[Any]:
    """The registry entries the user selected; a usage error when nothing was named.

    ``--all`` of a registry without kernels says so (and where to add one) instead of doing nothing silently.
    """
    from hpc_kernels.errors import UsageError

    if not args.names and not args.all:
        raise UsageError("name at least one kernel, or pass --all.")
    if args.names and args.all:
        raise UsageError("give kernel names or --all, not both.")
    chosen = list(registry.select(args.names, args.all))
    if args.all and not chosen:
        plain_note(no_kernels_note(registry))
    return chosen


def no_kernels_note(registry: Any) -> str:
    """What to say about a registry with no kernels (of its own): which file, and how to add one."""
    extended = getattr(registry, "base", None)
    theirs = (f"; --all acts on your own kernels only: those of {tilde(extended.path)}, which it extends, are "
              "its maintainers' (name one to act on it)") if extended is not None and registry.kernels else ""
    return (f"no kernels in {tilde(registry.path)}: add one under 'kernels:' (a name, and a 'def' recipe or "
            f"an 'image'; see docs/registry.md){theirs}.")


# ----------------------------------------------------------------------------- listings


@dataclass(frozen=True)
class Column:
    """One column of a listing; ``long`` ones (paths) get a line of their own when a row is too wide."""

    header: str
    long: bool = False


@dataclass(frozen=True)
class Cell:
    """A value with a rich style (a colour) used only in a terminal; printed as text, never as markup."""

    text: str
    style: str = ""


CellLike = Union[str, Cell]


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal, as rich judges it (it also honours FORCE_COLOR and TTY_COMPATIBLE)."""
    return console().is_terminal


def print_rows(columns: Sequence[Column], rows: Sequence[Sequence[CellLike]], title: str | None = None) -> None:
    """A listing nothing of which is ever cut: names and paths stay whole, so they can be copied.

    Not a terminal (a pipe, a file): the title on stderr, then on stdout a header and one line per row, the
    columns aligned with spaces (``list | grep NAME`` finds the whole row). A terminal: the same aligned
    columns, coloured, when they fit its width; otherwise the short columns on the row's line and each long
    one (a path) on a line of its own below it, whole. Linear time: 500 rows take milliseconds.
    """
    cells = [[c if isinstance(c, Cell) else Cell(c) for c in row] for row in rows]
    headers = [c.header for c in columns]
    if not stdout_is_terminal():
        if title:
            plain_note(title)
        widths = [max([len(h), *(len(row[i].text) for row in cells)]) for i, h in enumerate(headers)]
        lines = [_aligned(headers, widths)]
        lines += [_aligned([c.text for c in row], widths) for row in cells]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    _print_terminal(columns, cells, title)


def _aligned(texts: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(t.ljust(w) for t, w in zip(texts, widths)).rstrip()


def _print_terminal(columns: Sequence[Column], cells: list[list[Cell]], title: str | None) -> None:
    from rich.cells import cell_len
    from rich.text import Text

    out = console()
    widths = [max([cell_len(col.header), *(cell_len(row[i].text) for row in cells)])
              for i, col in enumerate(columns)]
    stacked = sum(widths) + 2 * (len(widths) - 1) > out.width and any(c.long for c in columns)
    inline = [i for i, c in enumerate(columns) if not (stacked and c.long)]
    below = [i for i, c in enumerate(columns) if stacked and c.long]
    label = max((cell_len(columns[i].header) for i in below), default=0) + 1
    text = Text()
    if title:
        text.append(title + "\n", style="italic")

    def line(row: Sequence[Cell], style: str = "") -> None:
        for n, i in enumerate(inline):
            cell = row[i]
            last = n == len(inline) - 1
            pad = "" if last else " " * (widths[i] - cell_len(cell.text) + 2)
            text.append(cell.text, style=style or cell.style)
            text.append(pad)
        text.append("\n")

    line([Cell(col.header) for col in columns], style="bold")
    for row in cells:
        line(row)
        for i in below:
            text.append(f"    {(columns[i].header + ':').ljust(label)} ", style="dim")
            text.append(row[i].text, style=row[i].style)
            text.append("\n")
    out.print(text, end="")
