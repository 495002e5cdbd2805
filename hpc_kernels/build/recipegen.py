"""The recipes hpc-kernels writes: one for a kernel given as ``python:``/``base:`` + ``requirements:`` (no
``.def``), and the *derived* recipe every Apptainer build runs, made from the kernel's recipe without
ever writing over it:

- a base that staging fetched becomes ``Bootstrap: localimage`` / ``From: <the staged SIF>``; without
  staging, a registry base is pinned to the digest its tag points to now (so the image can say it);
- relative ``%files`` sources and a relative ``localimage`` base become absolute (the derived recipe
  lives in the cache);
- a staged build's ``%post`` starts with ``PIP_NO_INDEX=1`` (pip in the recipe installs from the staged
  wheels or fails at once, never reaches an index);
- the kernel's ``requirements:`` are installed at the end (a staged build: with the staged pip wheel, so the
  image needs no pip), then the image records what is inside it in labels (``org.hpc-kernels.*``).

Pure text: no network, no process (``hpc-kernels show NAME --recipe`` prints a derivation).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import oci
from hpc_kernels.errors import HpcKernelsError

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry

#: Where a build finds what hpc-kernels adds (removed at the end of %post, so not in the image).
WORK_DIR = "/.hpck"
WHEELS_DIR = f"{WORK_DIR}/wheels"
PIP_DIR = f"{WORK_DIR}/pip"
REQ_DIR = f"{WORK_DIR}/req"
#: The pins of a staged wheelhouse (inside it): what the install step installs.
INSTALL_FILE = "hpck-install.txt"
#: Header keys of a registry bootstrap that mean nothing once the base is a local image.
_REGISTRY_KEYS = {"bootstrap", "from", "registry", "namespace", "includecmd", "fingerprints"}
_STAGE_RE = re.compile(r"^bootstrap:", re.IGNORECASE)
#: The official Python images (Debian slim, pip included) that ``python: "3.12"`` means.
PYTHON_IMAGE = "python:{version}-slim"


class Label(str, enum.Enum):
    """The labels every image hpc-kernels builds carries (``apptainer inspect --labels``)."""

    VERSION = "org.hpc-kernels.version"
    BUILD_ID = "org.hpc-kernels.build-id"
    INPUTS_DIGEST = "org.hpc-kernels.inputs-digest"
    RECIPE = "org.hpc-kernels.recipe"
    RECIPE_DIGEST = "org.hpc-kernels.recipe-digest"
    BASE = "org.hpc-kernels.base"
    BASE_DIGEST = "org.hpc-kernels.base-digest"
    STAGED = "org.hpc-kernels.staged"
    REQUIREMENTS = "org.hpc-kernels.requirements"
    REQUIREMENTS_DIGEST = "org.hpc-kernels.requirements-digest"
    LOCK = "org.hpc-kernels.lock"
    PACKAGES = "org.hpc-kernels.packages"


class RecipeGenError(HpcKernelsError):
    """A value that cannot be written into a recipe (a line break, a quote in a path...)."""


@dataclass(frozen=True)
class Source:
    """The recipe a kernel builds from, before hpc-kernels adds to it."""

    text: str
    path: Path | None  # the user's .def; None for a generated recipe
    origin: Path  # the directory relative paths in it are read from
    shown: str  # how messages and labels name it


@dataclass(frozen=True)
class StageInfo:
    """Where one stage of a recipe lies (0-based line indexes) and its header values."""

    index: int
    start: int  # first line of the stage (its Bootstrap: line, or 0)
    body: int  # first line of its first section (== end when it has none)
    end: int
    header: Mapping[str, tuple[str, int]]  # key (lowercase) -> (value, 1-based line)

    def get(self, key: str) -> str:
        """The value of header ``key`` ("" when absent)."""
        found = self.header.get(key)
        return found[0] if found else ""


@dataclass(frozen=True)
class Install:
    """The step that installs a kernel's requirements, at the end of the final stage's %post."""

    staged: bool  # from a staged wheelhouse with the staged pip wheel; else the image's pip and an index
    directory: Path  # host directory copied in: the wheelhouse (staged) or the normalised requirement files
    requirement: str  # file in it given to pip with -r
    pip_wheel: Path | None = None  # staged: the pip wheel that runs the install
    python: str | None = None  # the Python a lock was made for (checked in the image)
    ipykernel: bool = False  # without staging: install ipykernel when the image lacks it


@dataclass(frozen=True)
class Derivation:
    """Everything :func:`derive` adds to or changes in a recipe."""

    labels: tuple[tuple[str, str], ...]
    bases: Mapping[int, Path] = field(default_factory=dict)  # stage -> staged SIF (Bootstrap: localimage)
    pins: Mapping[int, str] = field(default_factory=dict)  # stage -> pinned reference (no staging)
    offline: bool = False  # a staged build: pip never reaches an index
    wheels: Path | None = None  # staged wheelhouse the recipe's own pip installs from
    install: Install | None = None
    pythons: tuple[str, ...] = ("python3", "python")  # where the labels' package list comes from


# ----------------------------------------------------------------------------- the kernel's recipe


def generate(entry: KernelEntry, registry_line: str = "") -> str:
    """The recipe of a kernel given as ``python:``/``base:`` (no ``.def``): its base, nothing more (the
    derivation adds the requirements and labels)."""

    where = f" ({registry_line})" if registry_line else ""
    lines = [f"# Generated by hpc-kernels for kernel '{entry.name}'{where}.",
             "# The requirements, ipykernel (when the base lacks it) and the labels are added when it is built:",
             f"# 'hpc-kernels show {entry.name} --recipe' prints the whole recipe."]
    if entry.base is None:
        ref = PYTHON_IMAGE.format(version=entry.python)
        lines += ["Bootstrap: docker", f"From: {ref}"]
    elif entry.base.transport is oci.Transport.LOCAL:
        lines += ["Bootstrap: localimage", f"From: {_header_value(entry.base.repository, 'base')}"]
    else:
        ref_text = str(entry.base).split("://", 1)[1]
        lines += [f"Bootstrap: {entry.base.transport.value}", f"From: {_header_value(ref_text, 'base')}"]
    return "\n".join(lines) + "\n"


def source(entry: KernelEntry) -> Source:
    """The recipe ``entry`` builds from: its ``def`` file, or the one :func:`generate` writes."""
    if entry.recipe is not None:
        try:
            text = entry.recipe.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise RecipeGenError(f"cannot read the recipe {entry.recipe}: {exc.strerror}.") from None
        return Source(text, entry.recipe, entry.recipe.parent, str(entry.recipe))
    where = f" ({entry.origin})" if entry.origin is not None else ""
    return Source(generate(entry), None, entry.recipe_origin, f"the recipe generated for kernel '{entry.name}'{where}")


# ----------------------------------------------------------------------------- reading stages


def split(text: str) -> list[StageInfo]:
    """The stages of a recipe as Apptainer splits them (see :mod:`hpc_kernels.build.recipe`), with line spans.
    Lines before the first ``Bootstrap:`` line (comments, for a recipe :func:`recipe.check` accepts) belong
    to no stage: :func:`preamble`."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _STAGE_RE.match(line)] or [0]
    found: list[StageInfo] = []
    for n, begin in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = end
        header: dict[str, tuple[str, int]] = {}
        key_cont = ""
        for i in range(begin, end):
            stripped = lines[i].strip()
            words = stripped.split()
            if words and words[0].startswith("%"):
                body = i
                break
            if not stripped or stripped.startswith("#"):
                continue
            part = stripped.split("#", 1)[0].rstrip()
            if key_cont:
                value, at = header[key_cont]
                header[key_cont] = (value + part.removesuffix("\\").strip(), at)
                key_cont = key_cont if part.endswith("\\") else ""
                continue
            key, colon, value = part.partition(":")
            if colon:
                header[key.strip().lower()] = (value.strip().removesuffix("\\").strip(), i + 1)
                key_cont = key.strip().lower() if part.endswith("\\") else ""
        found.append(StageInfo(n, begin, body, end, header))
    return found


def preamble(text: str) -> list[str]:
    """The lines before the first stage (comments)."""
    stages = split(text)
    return text.splitlines()[: stages[0].start] if stages else []


def sections(lines: Sequence[str], begin: int, end: int) -> list[tuple[str, int, int]]:
    """The sections between ``begin`` and ``end``: (name with its arguments, first content line, end)."""
    found: list[tuple[str, int, int]] = []
    for i in range(begin, end):
        words = lines[i].strip().split()
        if words and words[0].startswith("%"):
            if found:
                found[-1] = (found[-1][0], found[-1][1], i)
            found.append((" ".join(words).lower(), i + 1, end))
    return found


# ----------------------------------------------------------------------------- quoting


def quote_path(path: str, what: str) -> str:
    """``path`` as a ``%files`` word: double-quoted when it holds white space; refused when Apptainer could not
    read it back (a quote, a backslash, a control character)."""
    if re.search(r'["\\\x00-\x1f\x7f]', path):
        raise RecipeGenError(f"the {what} path {path!r} cannot be written into a recipe (it holds a quote, a "
                             "backslash or a control character): rename it.")
    return f'"{path}"' if re.search(r"\s", path) else path


def _header_value(value: str, what: str) -> str:
    if re.search(r"[#\x00-\x1f\x7f]", value) or value != value.strip():
        raise RecipeGenError(f"the {what} {value!r} cannot be written into a recipe header (it holds '#', a "
                             "control character or surrounding white space).")
    return value


def _label_value(value: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)


def _comment(value: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)
