"""Build records (stamps) and image state: what an image was built from and where it stands against its inputs.

An image is rebuilt only when its *inputs* change: the recipe, the files its ``%files`` section
copies, a ``localimage`` base, and the build options. Their digest is recorded beside the image
(``<image>.hpck.json``); a no-op build reads files and runs no external process.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hpc_kernels.runtimes.docker.build as docker_build
from hpc_kernels import access
from hpc_kernels.build import recipegen
from hpc_kernels.build.recipe import localimage_bases
from hpc_kernels.errors import BuildError, HpcKernelsError
from hpc_kernels.model import KernelEntry, Runtime
from hpc_kernels.runtimes.docker.cli import ContainerCLI
from hpc_kernels.staging import requirements

DIGEST_FORMAT = "hpck-build-1"
STAMP_SUFFIX = ".hpck.json"

EventSink = Callable[[str], None]


@dataclass(frozen=True)
class ImageState:
    """Where an image stands against its inputs."""

    # built | stale | missing | foreign (exists, not built by us) | external | external-missing
    # | damaged (size or mtime differs from what we built: truncated, overwritten) | no-runtime
    # (docker/podman absent or unreachable) | unreadable (this user may not read it: a group's image)
    # | unchecked (readable, but its recipe or build record is not: whether it is stale cannot be told)
    status: str
    digest: str  # digest of the current inputs ("" for external images)
    recorded: str | None  # digest recorded with the image, if any
    built_at: float | None = None



def stamp_path(image: Path) -> Path:
    """The record of what an image was built from."""
    return image.with_name(image.name + STAMP_SUFFIX)


def build_options(entry: KernelEntry) -> list[str]:
    """The runtime build flags implied by the registry (part of the input digest)."""
    opts: list[str] = []
    if entry.fakeroot:
        opts.append("--fakeroot")
    if entry.compression != "gzip":
        opts += ["--mksquashfs-args", f"-comp {entry.compression}"]
    return opts


@dataclass(frozen=True)
class FilesSource:
    """One host source of a recipe's ``%files`` section, as written and where it points."""

    text: str  # the source as written in the recipe
    line: int  # its line in the recipe (1-based)
    paths: tuple[Path, ...]  # the glob's matches, or the resolved path when nothing matches

    @property
    def exists(self) -> bool:
        """True when the source names something on this host (a file, a directory, a glob's matches)."""
        return any(p.exists() for p in self.paths)


def parse_recipe(recipe: Path, text: str | None = None) -> tuple[list[FilesSource], Path | None]:
    """Host sources a recipe copies in (``%files``, not ``%files from <stage>``) and a localimage base.

    ``text`` is the recipe's content when the caller has already read it.
    """
    sources: list[FilesSource] = []
    section = ""
    if text is None:
        text = recipe.read_text(encoding="utf-8", errors="replace")
    # The header as Apptainer reads it (hpc_kernels.build.recipe); the last localimage stage's base counts.
    bases = localimage_bases(recipe, text)
    base = bases[-1] if bases else None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if raw[:10].lower() == "bootstrap:":  # a new stage: its header, not the last stage's section
            section = ""
            continue
        if line.startswith("%"):
            section = line.split()[0].lower() if line.split()[1:2] != ["from"] else "%files-from"
            continue
        if section == "%files":
            try:
                src = shlex.split(line)[0]
            except (ValueError, IndexError):
                continue
            resolved = _resolve(recipe.parent, src)
            matches = sorted(glob.glob(str(resolved)))
            sources.append(FilesSource(src, number, tuple(Path(m) for m in matches) or (resolved,)))
    return sources, base


def recipe_inputs(recipe: Path, text: str | None = None) -> tuple[list[Path], Path | None]:
    """Host files a recipe copies in (``%files``, not ``%files from <stage>``) and a localimage base.

    ``text`` is the recipe's content when the caller has already read it.
    """
    sources, base = parse_recipe(recipe, text)
    return [p for src in sources for p in src.paths], base


def missing_inputs(recipe: Path) -> list[str]:
    """One sentence per ``%files`` source of ``recipe`` that does not exist, with the recipe's file:line.

    Apptainer finds these only after it has pulled and extracted the base image; we look first.
    """
    try:
        sources, _base = parse_recipe(recipe)
    except OSError:
        return []  # the registry checked the recipe exists; the build reports what went wrong
    problems = []
    for src in sources:
        if not src.exists:
            looked = f"looked for {src.paths[0]}" if src.paths[0] != Path(src.text) else "no such file"
            problems.append(f"{recipe}:{src.line}: %files source '{src.text}' does not exist ({looked}); "
                            "create it, or fix that line (relative paths start at the recipe's directory).")
    return problems


def check_inputs(entry: KernelEntry) -> None:
    """Raise a :class:`BuildError` naming every ``%files`` source of ``entry``'s recipe that is missing."""
    if entry.recipe is None:
        return
    problems = missing_inputs(entry.recipe)
    if len(problems) == 1:
        raise BuildError(entry.name, problems[0])
    if problems:
        raise BuildError(entry.name, f"{len(problems)} %files sources of its recipe do not exist:",
                         "\n".join(problems))


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expandvars(value)).expanduser()
    return p if p.is_absolute() else base / p


def digest_parts(entry: KernelEntry) -> list[bytes]:
    """What the input digest covers besides a ``def`` recipe and its %files: the recipe hpc-kernels generates,
    the requirement files and the kernel's lock. Best effort (``list`` digests every kernel): never raises."""
    parts: list[bytes] = []
    if entry.recipe is None:
        try:
            parts.append(recipegen.generate(entry).encode())
        except HpcKernelsError as exc:
            parts.append(str(exc).encode())
        parts.append(json.dumps(list(entry.command)).encode())
    if entry.requirements is not None:
        for path, data in requirements.read_bytes(entry.requirements):
            parts.append(f"requirements:{path.name}:".encode() + data)
    if entry.lock is not None:
        # No lock: nothing added, so images built before locks existed keep their digest.
        with contextlib.suppress(OSError):
            parts.append(b"lock:" + entry.lock.read_bytes())
    return parts


def input_digest(entry: KernelEntry) -> str:
    """sha256 over the recipe, its %files sources, a localimage base (size+mtime), the options, and
    (:func:`hpc_kernels.build.stamps.digest_parts`) a generated recipe, requirement files and the kernel's lock."""
    if not entry.buildable:
        return ""
    h = hashlib.sha256()
    h.update(DIGEST_FORMAT.encode())
    h.update(entry.runtime.encode())
    h.update(json.dumps(build_options(entry)).encode())
    if entry.recipe is None or entry.requirements is not None or (entry.lock is not None and entry.lock.exists()):
        for part in digest_parts(entry):
            h.update(part)
    if entry.recipe is None:
        if entry.base is not None and entry.base.transport.value == "local":
            _hash_base(h, Path(entry.base.repository))
        return h.hexdigest()
    data = entry.recipe.read_bytes()  # read once: `list` digests every kernel of the registry
    h.update(data)
    sources, base = recipe_inputs(entry.recipe, data.decode("utf-8", errors="replace"))
    for src in sources:
        _hash_tree(h, src, entry.recipe.parent)
    if base is not None:
        _hash_base(h, base)
    return h.hexdigest()


def _hash_base(h: hashlib._Hash, base: Path) -> None:
    try:
        st = base.stat()
        h.update(f"base:{base}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        h.update(f"base:{base}:missing".encode())


def _hash_tree(h: hashlib._Hash, path: Path, root: Path) -> None:
    rel = os.path.relpath(path, root)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _hash_tree(h, child, root)
    elif path.is_file():
        h.update(f"file:{rel}:".encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(f"missing:{rel}".encode())


def read_stamp(image: Path) -> dict[str, object] | None:
    """The build record beside ``image``, or None."""
    try:
        data = json.loads(stamp_path(image).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def image_state(entry: KernelEntry, cli: ContainerCLI | None = None) -> ImageState:
    """Compare the image with the digest of its current inputs (for a .sif: no external process;
    docker/podman images: one ``image inspect`` of the digest label, by ``cli`` when given)."""
    if entry.runtime in (Runtime.DOCKER, Runtime.PODMAN):
        digest = input_digest(entry) if entry.recipe is not None else ""
        status, recorded, when = docker_build.label_state(entry, digest, cli)
        return ImageState(status, digest, recorded, when)
    if not entry.buildable:
        if access.blocker(entry.image) is not None:  # a group's image (or a directory on its way) closed to us
            return ImageState("unreadable", "", None)
        return ImageState("external" if entry.image.exists() else "external-missing", "", None)
    try:
        digest = input_digest(entry)
    except PermissionError:  # a group's recipe (or %files) this user may not read: cannot tell if stale
        digest = ""
    try:
        st = entry.image.stat()
    except FileNotFoundError:
        return ImageState("missing", digest, None)
    except PermissionError:  # a directory on the way this user may not enter (doctor says which)
        return ImageState("unreadable", digest, None)
    if not os.access(entry.image, os.R_OK):
        return ImageState("unreadable", digest, None)
    stamp = read_stamp(entry.image)
    recorded = str(stamp.get("digest")) if stamp else None
    built_at = stamp.get("built_at") if stamp else None
    if stamp is None:
        if os.path.lexists(stamp_path(entry.image)):  # there, but not readable to this user
            return ImageState("unchecked", digest, None)
        # An image we did not build (no record beside it): never overwritten by a build.
        return ImageState("foreign", digest, None)
    status = "built" if recorded == digest else "stale"
    if not digest:
        status = "unchecked"
    if _changed_since_build(stamp, st):
        status = "damaged"
    return ImageState(status, digest, recorded, float(built_at) if isinstance(built_at, (int, float)) else None)


def _changed_since_build(stamp: dict[str, object], st: os.stat_result) -> bool:
    """True when the image is not the file we built (truncated by a full disk or quota, copied over):
    its size or mtime differs from the record. A stat, no hashing (``list`` looks at every image).
    Records of earlier versions carry neither: nothing to compare."""
    size, mtime = stamp.get("size"), stamp.get("mtime_ns")
    return (isinstance(size, int) and size != st.st_size) or (isinstance(mtime, int) and mtime != st.st_mtime_ns)
