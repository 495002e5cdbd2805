"""The headers of Apptainer recipes (definition files), read the way Apptainer reads them, and the
check every build runs before Apptainer does.

Why our own parser: spython's reads ``Bootstrap:``/``From:`` even in comment lines, so it can see a
header that Apptainer does not. Apptainer (``pkg/build/types/parser``) starts a new stage at every
line that begins with ``Bootstrap:`` (column 0, any case), ends a stage's header at the first line
whose first word starts with ``%``, skips blank lines and lines starting with ``#``, cuts each header
line at its first ``#``, splits it at its first ``:`` and lowercases the key; a value ending in ``\\``
continues on the next line.

Why the check: Apptainer resolves an empty ``From:`` of ``Bootstrap: localimage`` to ``.`` — the
directory the build runs in, which is the recipe's — and packages that whole directory (private files
included) into the image. So a header must name everything a build starts from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.group import explain_unreadable

#: Apptainer's bootstrap agents (internal/pkg/build/conveyorPacker.go) and the header keys each one
#: cannot do without. (zypper can take its mirror from a SLE product; arch and scratch need nothing.)
BOOTSTRAPS: dict[str, tuple[str, ...]] = {
    "library": ("from",), "oras": ("from",), "shub": ("from",),
    "docker": ("from",), "docker-archive": ("from",), "docker-daemon": ("from",),
    "oci": ("from",), "oci-archive": ("from",), "localimage": ("from",),
    "busybox": ("mirrorurl",), "debootstrap": ("mirrorurl", "osversion"), "yum": ("mirrorurl",),
    "zypper": (), "arch": (), "scratch": (),
}
#: How each required key is written in a recipe, and an example value for the fix.
_KEY_NAMES = {"from": "From", "mirrorurl": "MirrorURL", "osversion": "OSVersion"}
_EXAMPLES = {
    "localimage": "From: /project/def-pi/images/base.sif",
    "docker": "From: python:3.12-slim",
    "debootstrap": "MirrorURL: http://deb.debian.org/debian/ and OSVersion: bookworm",
}
_STAGE_RE = re.compile(r"^bootstrap:", re.IGNORECASE)
#: What makes a directory an Apptainer sandbox image (``apptainer build --sandbox`` writes it).
SANDBOX_MARK = ".singularity.d"


class RecipeError(HpcKernelsError):
    """A recipe Apptainer must not be run on; ``str(err)`` starts with ``file:line``."""


@dataclass(frozen=True)
class Stage:
    """The header of one stage of a recipe: each key (lowercase) with its value and 1-based line."""

    line: int  # where the stage starts
    header: dict[str, tuple[str, int]] = field(default_factory=dict)
    has_body: bool = False  # any section (%post, %files...) follows the header

    def get(self, key: str) -> str | None:
        """The value of header key ``key`` (lowercase), or None."""
        found = self.header.get(key)
        return found[0] if found else None

    def line_of(self, key: str) -> int:
        """The line of ``key``, or the stage's first line when it is absent."""
        found = self.header.get(key)
        return found[1] if found else self.line


def stages(text: str) -> list[Stage]:
    """Every stage of a recipe that holds anything besides blank and comment lines."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _STAGE_RE.match(line)]
    bounds = list(zip([0, *starts], [*starts, len(lines)]))
    found = []
    for begin, end in bounds:
        if begin == end:
            continue
        header: dict[str, tuple[str, int]] = {}
        has_body = False
        key_cont, val_cont, cont_line = "", "", 0
        for number in range(begin, end):
            line = lines[number].strip()
            words = line.split()
            if words and words[0].startswith("%"):
                has_body = True
                break
            if not line or line.startswith("#"):
                continue
            text_part = line.split("#", 1)[0]
            if key_cont:
                key, value, at = key_cont, val_cont + text_part.strip(), cont_line
                key_cont = ""
            else:
                key, colon, value = text_part.partition(":")
                if not colon:
                    raise _error(number + 1, f"the header line {line!r} is not 'Key: value'",
                                 "write it as Key: value, or start a section (%post, %files...) before it")
                key, value, at = key.strip().lower(), value.strip(), number + 1
            if value.endswith("\\"):
                key_cont, val_cont, cont_line = key, value[:-1], at
                continue
            header[key] = (value, at)  # as in Apptainer, a repeated key's last value counts
        if header or has_body:
            found.append(Stage(begin + 1, header, has_body))
    return found


def _error(line: int, problem: str, fix: str, path: Path | None = None) -> RecipeError:
    where = f"{path}:{line}" if path is not None else f"line {line}"
    return RecipeError(f"{where}: {problem}; {fix}.")


def check(path: Path, text: str | None = None) -> list[Stage]:
    """Refuse (:class:`RecipeError`, ``file:line`` and the fix) a recipe whose header is incomplete.

    Every stage needs a known ``Bootstrap:`` and the keys that agent requires (``From:`` for
    localimage, docker, library...; ``MirrorURL:``/``OSVersion:`` for debootstrap...), with a value.
    A ``localimage`` base that is a directory must be an Apptainer sandbox (it has ``.singularity.d``):
    any other directory would be packaged whole. Relative paths are read from the recipe's directory,
    where the build runs. Returns the stages.
    """
    if text is None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except PermissionError as exc:  # a group's recipe: say who can fix it
            why = explain_unreadable(path)
            raise RecipeError(f"cannot read the recipe {path}: {why or f'{exc.strerror}.'}") from None
        except OSError as exc:
            raise RecipeError(f"cannot read the recipe {path}: {exc.strerror}.") from None
    try:
        found = stages(text)
    except RecipeError as exc:
        raise RecipeError(f"{path}:{str(exc).removeprefix('line ')}") from None
    if not found:
        raise _error(1, "the recipe is empty", "start it with a header such as 'Bootstrap: localimage' "
                     f"and '{_EXAMPLES['localimage']}'", path)
    for stage in found:
        bootstrap = stage.get("bootstrap")
        if not bootstrap:
            raise _error(stage.line, "this stage of the recipe has no 'Bootstrap:' line", "begin it with one "
                         f"such as 'Bootstrap: localimage' and '{_EXAMPLES['localimage']}'", path)
        if bootstrap not in BOOTSTRAPS:
            close = [b for b in BOOTSTRAPS if b == bootstrap.lower()]
            hint = f"write 'Bootstrap: {close[0]}'" if close else f"use one of {', '.join(BOOTSTRAPS)}"
            raise _error(stage.line_of("bootstrap"), f"Apptainer has no bootstrap agent {bootstrap!r}", hint, path)
        for key in BOOTSTRAPS[bootstrap]:
            if not stage.get(key):
                example = _EXAMPLES.get(bootstrap, f"{_KEY_NAMES[key]}: ...")
                why = " (Apptainer would package the directory the build runs in)" \
                    if bootstrap == "localimage" else ""
                raise _error(stage.line_of(key) if key in stage.header else stage.line_of("bootstrap"),
                             f"'Bootstrap: {bootstrap}' needs '{_KEY_NAMES[key]}:' with a value{why}",
                             f"add e.g. '{example}'", path)
        if bootstrap == "localimage":
            _check_local_base(path, stage)
    return found


def _check_local_base(path: Path, stage: Stage) -> None:
    value = stage.get("from") or ""
    base = Path(value) if Path(value).is_absolute() else path.parent / value
    if base.is_dir() and not (base / SANDBOX_MARK).is_dir():
        raise _error(stage.line_of("from"), f"'From: {value}' is a directory ({base}), not an image, and "
                     "Apptainer would package all of it", "name a .sif image (a directory is accepted only "
                     f"when it is an Apptainer sandbox, with {SANDBOX_MARK})", path)


def localimage_bases(path: Path, text: str) -> list[Path]:
    """The ``From:`` of every ``localimage`` stage, relative ones read from the recipe's directory
    (no check; a recipe Apptainer cannot read has none)."""
    try:
        found = stages(text)
    except RecipeError:
        return []
    bases = []
    for stage in found:
        value = stage.get("from")
        if stage.get("bootstrap") == "localimage" and value:
            bases.append(Path(value) if Path(value).is_absolute() else path.parent / value)
    return bases
