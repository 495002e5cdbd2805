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
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import oci
from hpc_kernels.errors import HpcKernelsError

if TYPE_CHECKING:
    from hpc_kernels.registry import KernelEntry

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


# ----------------------------------------------------------------------------- deriving


def derive(src: Source, how: Derivation) -> str:
    """The recipe a build runs: ``src`` with the bases, paths, pip settings, install step and labels of ``how``."""
    lines = src.text.splitlines()
    stages = split(src.text)
    out: list[str] = [f"# Derived by hpc-kernels from {_comment(src.shown)}; that recipe is never written over.",
                      *preamble(src.text)]
    for stage in stages:
        final = stage.index == len(stages) - 1
        # A %post of ours needs a shell in the image: only where the recipe runs one already (or where
        # requirements must be installed), so an image without /bin/sh (scratch, distroless) still builds.
        has_post = any(name.split()[0] == "%post" for name, _b, _e in sections(lines, stage.body, stage.end))
        out += _header(lines, stage, src, how)
        if how.offline and has_post:
            out += ["%post", "    # hpc-kernels, staged build: pip installs from the staged wheels only, never from "
                    "an index.", "    export PIP_NO_INDEX=1"]
            if how.wheels is not None:
                out.append(f"    export PIP_FIND_LINKS={WHEELS_DIR}")
        out += _body(lines, stage, src)
        out += _additions(how, final, has_post)
    return "\n".join(out) + "\n"


def _header(lines: list[str], stage: StageInfo, src: Source, how: Derivation) -> list[str]:
    header = lines[stage.start:stage.body]
    bootstrap = stage.get("bootstrap").lower()
    if stage.index in how.bases:
        kept = _drop_keys(header, _REGISTRY_KEYS)
        sif = _header_value(str(how.bases[stage.index]), "staged base")
        return ["Bootstrap: localimage", f"From: {sif}", *kept]
    if stage.index in how.pins:
        kept = _drop_keys(header, {"from", "registry", "namespace"})
        at = next((i for i, line in enumerate(kept) if _key_of(line) == "bootstrap"), -1)
        kept.insert(at + 1, f"From: {_header_value(how.pins[stage.index], 'base')}")
        return kept
    if bootstrap == "localimage":
        value = stage.get("from")
        if value and not Path(value).expanduser().is_absolute():
            kept = _drop_keys(header, {"from"})
            at = next((i for i, line in enumerate(kept) if _key_of(line) == "bootstrap"), -1)
            kept.insert(at + 1, f"From: {_header_value(str(src.origin / value), 'base')}")
            return kept
    return list(header)


def _key_of(line: str) -> str:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return ""
    key, colon, _value = stripped.split("#", 1)[0].partition(":")
    return key.strip().lower() if colon else ""


def _drop_keys(header: list[str], keys: set[str]) -> list[str]:
    kept: list[str] = []
    dropping = False
    for line in header:
        if dropping:
            dropping = line.split("#", 1)[0].rstrip().endswith("\\")
            continue
        if _key_of(line) in keys:
            dropping = line.split("#", 1)[0].rstrip().endswith("\\")
            continue
        kept.append(line)
    return kept


def _body(lines: list[str], stage: StageInfo, src: Source) -> list[str]:
    body = lines[stage.body:stage.end]
    out: list[str] = []
    in_files = False
    for line in body:
        words = line.strip().split()
        if words and words[0].startswith("%"):
            # `%files from <stage>` copies out of another stage: its sources are not host paths.
            in_files = words[0].lower() == "%files" and len(words) == 1
            out.append(line)
            continue
        if in_files and words and not words[0].startswith("#"):
            out.append(_absolute_files_line(line, src.origin))
        else:
            out.append(line)
    return out


def _absolute_files_line(line: str, origin: Path) -> str:
    try:
        parts = shlex.split(line)
    except ValueError:
        return line  # Apptainer reports it; not ours to guess
    if not parts:
        return line
    src = Path(parts[0]).expanduser()
    if src.is_absolute():
        return line
    indent = line[: len(line) - len(line.lstrip())]
    rest = " ".join(quote_path(p, "%files destination") for p in parts[1:])
    return f"{indent}{quote_path(str(origin / src), '%files source')}" + (f" {rest}" if rest else "")


def _additions(how: Derivation, final: bool, has_post: bool) -> list[str]:
    out: list[str] = []
    files: list[str] = []
    install = how.install if final else None
    wheels = how.wheels if how.offline and has_post else None
    if wheels is not None:
        files.append(f"    {quote_path(str(wheels), 'wheelhouse')} {WHEELS_DIR}")
    if install is not None:
        if install.staged:
            if install.directory != wheels:
                files.append(f"    {quote_path(str(install.directory), 'wheelhouse')} {WHEELS_DIR}")
            if install.pip_wheel is not None:
                wheel = install.pip_wheel
                files.append(f"    {quote_path(str(wheel), 'pip wheel')} {PIP_DIR}/{wheel.name}")
        else:
            files.append(f"    {quote_path(str(install.directory), 'requirements')} {REQ_DIR}")
    if files:
        out += ["", "%files", *files]
    if final and (has_post or install is not None):
        out += ["", "%post", "    # Added by hpc-kernels: the kernel's requirements, then what is inside (labels)."]
        out += _find_python(how.pythons)
        if install is not None:
            out += _install_lines(install)
        out += _packages_label()
        out.append(f"    rm -rf {WORK_DIR}")
    elif files:  # the wheels of this stage's own pip: not kept in the image (a later stage copies what it needs)
        out += ["", "%post", f"    rm -rf {WORK_DIR}"]
    if final:
        out += ["", "%labels", *(f"    {key} {_label_value(value)}" for key, value in how.labels)]
    return out


def _find_python(pythons: Sequence[str]) -> list[str]:
    names = " ".join(shlex.quote(p) for p in dict.fromkeys(pythons))
    return [
        '    hpck_py=""',
        f"    for hpck_c in {names}; do",
        '        if command -v "$hpck_c" >/dev/null 2>&1; then hpck_py=$(command -v "$hpck_c"); break; fi',
        "    done",
    ]


def _install_lines(install: Install) -> list[str]:
    no_python = shlex.quote("hpc-kernels: no python3 or python in the image to install the kernel's "
                            "requirements with.")
    out = [f'    if [ -z "$hpck_py" ]; then echo {no_python} >&2; exit 1; fi']
    if install.python:
        major, minor = install.python.split(".")
        wrong = shlex.quote(f"hpc-kernels: the lock was made for Python {install.python}, but this image's "
                            "Python is another: build with --lock again, or use a base with that Python.")
        out.append(f"    \"$hpck_py\" -c 'import sys; sys.exit(sys.version_info[:2] != ({int(major)}, {int(minor)}))' "
                   f"|| {{ echo {wrong} >&2; exit 1; }}")
    env = "PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1"
    if install.staged:
        # A wheel is importable as a zip: the staged pip runs in an image that has none.
        run = f'"$hpck_py" {PIP_DIR}/{install.pip_wheel.name}/pip' if install.pip_wheel is not None \
            else '"$hpck_py" -m pip'
        out.append(f"    {env} {run} install --no-index --find-links {WHEELS_DIR} --no-cache-dir "
                   f"-r {WHEELS_DIR}/{shlex.quote(install.requirement)}")
        return out
    no_pip = shlex.quote("hpc-kernels: the base image has no pip to install the kernel's requirements with: set "
                         "'staging: always' in the registry (hpc-kernels then brings pip and the wheels), or use a "
                         "base image with pip.")
    out.append(f'    "$hpck_py" -m pip --version >/dev/null 2>&1 || {{ echo {no_pip} >&2; exit 1; }}')
    out.append(f'    {env} "$hpck_py" -m pip install --no-cache-dir -r {REQ_DIR}/{shlex.quote(install.requirement)}')
    if install.ipykernel:
        out.append(f"    \"$hpck_py\" -c 'import ipykernel' 2>/dev/null || {env} \"$hpck_py\" -m pip install "
                   "--no-cache-dir ipykernel")
    return out


#: Prints one ``org.hpc-kernels.packages name==version ...`` line: every distribution the image's Python
#: sees (the first on sys.path of each name, as import picks), like ``pip freeze`` without needing pip.
FREEZE = (
    'import importlib.metadata as m, re; seen = {}\n'
    'for d in m.distributions():\n'
    '    n = d.metadata["Name"]\n'
    '    if n: seen.setdefault(re.sub(r"[-_.]+", "-", n).lower(), n + "==" + d.version)\n'
    f'print("{Label.PACKAGES.value} " + " ".join(sorted(seen.values(), key=str.lower)))'
)


def _packages_label() -> list[str]:
    return [
        '    hpck_labels="${APPTAINER_LABELS:-${SINGULARITY_LABELS:-}}"',
        '    if [ -n "$hpck_py" ] && [ -n "$hpck_labels" ]; then',
        f'        "$hpck_py" -c {shlex.quote(FREEZE)} >>"$hpck_labels" || true',
        "    fi",
    ]


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
