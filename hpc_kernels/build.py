"""Incremental, atomic, locked image builds.

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
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import paths
from hpc_kernels.errors import BuildBusyError, BuildError, HpcKernelsError, LockBusyError
from hpc_kernels.fsutil import LockRecord, atomic_write, cluster_lock, open_private, share_for
from hpc_kernels.registry import KernelEntry
from hpc_kernels.runtimes.base import Builder
from hpc_kernels.staging_settings import Fetch

if TYPE_CHECKING:
    from hpc_kernels.buildtemp import BuildTemp
    from hpc_kernels.imagecheck import Probe

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


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` did for one kernel."""

    kernel: str
    action: str  # built | up-to-date
    image: Path
    log_path: Path | None
    seconds: float


#: What a build that cannot reach the network prints (Apptainer/Go, apt, curl, pip): on a cluster, a
#: compute node without internet. Matched against the tail of the build log.
OFFLINE_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"dial tcp: lookup \S+.*no such host",
    r"dial tcp .*: i/o timeout",
    r"network is unreachable",
    r"temporary failure in name resolution",
    r"temporary failure resolving",  # apt
    r"could not resolve host",  # curl, git
    r"(dial tcp|https?://|registry|docker\.io|quay\.io|ghcr\.io|pypi|pythonhosted).*connection refused",
    r"connection refused.*(https?://|registry|docker\.io|pypi)",
    r"NewConnectionError|Failed to establish a new connection",  # pip (urllib3)
    r"Could not find a version that satisfies the requirement",  # pip, offline or without an index
))


def offline_hint(log_tail: str, entry: KernelEntry | None = None, staged: bool = False) -> str:
    """A hint for a build log that says the network could not be reached ("" when it does not): the
    registry's ``staging:`` setting, or (a staged build) what staging does not cover."""
    from hpc_kernels.staging import offline_hint as hint

    for line in reversed(log_tail.splitlines()):
        if any(p.search(line) for p in OFFLINE_PATTERNS):
            return hint(entry, line, staged)
    return ""


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
    from hpc_kernels.recipe import localimage_bases

    sources: list[FilesSource] = []
    section = ""
    if text is None:
        text = recipe.read_text(encoding="utf-8", errors="replace")
    # The header as Apptainer reads it (hpc_kernels.recipe); the last localimage stage's base counts.
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


def input_digest(entry: KernelEntry) -> str:
    """sha256 over the recipe, its %files sources, a localimage base (size+mtime), the options, and
    (:func:`hpc_kernels.staging.digest_parts`) a generated recipe, requirement files and the kernel's lock."""
    if not entry.buildable:
        return ""
    h = hashlib.sha256()
    h.update(DIGEST_FORMAT.encode())
    h.update(entry.runtime.encode())
    h.update(json.dumps(build_options(entry)).encode())
    if entry.recipe is None or entry.requirements is not None or (entry.lock is not None and entry.lock.exists()):
        from hpc_kernels.staging import digest_parts  # not for a plain recipe: `list` digests every kernel

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


def image_state(entry: KernelEntry) -> ImageState:
    """Compare the image with the digest of its current inputs (for a .sif: no external process;
    docker/podman images: one ``image inspect`` of the digest label)."""
    if entry.runtime in ("docker", "podman"):
        import hpc_kernels.runtimes.docker.build as docker_build

        return docker_build.image_state(entry)
    if not entry.buildable:
        from hpc_kernels import access

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


@contextlib.contextmanager
def build_environment(temp: BuildTemp | None = None) -> Iterator[None]:
    """DRAC's advice for builds, for this process only: no APPTAINER_BIND, the cache on node-local disk; and,
    for the build ``temp``, its private ``APPTAINER_TMPDIR`` and the record its guard reads."""
    saved = dict(os.environ)
    for var in ("APPTAINER_BIND", "SINGULARITY_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BINDPATH"):
        os.environ.pop(var, None)
    tmp = os.environ.get("SLURM_TMPDIR")
    if tmp and "APPTAINER_CACHEDIR" not in saved:
        os.environ["APPTAINER_CACHEDIR"] = str(Path(tmp) / "apptainer-cache")
        Path(os.environ["APPTAINER_CACHEDIR"]).mkdir(parents=True, exist_ok=True)
    if temp is not None:
        from hpc_kernels import buildtemp

        os.environ["APPTAINER_TMPDIR"] = str(temp.tmpdir)
        os.environ.pop("SINGULARITY_TMPDIR", None)
        os.environ[buildtemp.ENV_RECORD] = str(temp.record)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def build_workspace(entry: KernelEntry, note: EventSink) -> Iterator[BuildTemp]:
    """The places of one build (:mod:`hpc_kernels.buildtemp`), made under the image's lock after sweeping
    what killed builds of the image left; removed afterwards. When the build fails or is interrupted, its
    processes are stopped first (their guard watches the record this cancels)."""
    from hpc_kernels import buildtemp

    for line in buildtemp.sweep_image(entry.image):
        note(f"hpc-kernels: {line}")
    try:
        temp = buildtemp.create(entry.name, entry.image)
    except OSError as exc:
        where = exc.filename or entry.image.parent
        raise BuildError(entry.name, f"cannot prepare the build's temporary files in {where}: "
                         f"{exc.strerror or exc}; the images directory and $APPTAINER_TMPDIR (else $SLURM_TMPDIR, "
                         "else /tmp) must be writable") from None
    try:
        yield temp
    except BaseException:
        buildtemp.cancel(temp)
        buildtemp.wait_for_guard(temp)
        raise
    finally:
        for problem in buildtemp.remove(temp):
            note(f"hpc-kernels: could not remove {problem} ('hpc-kernels gc' will try again)")


def verify_image(entry: KernelEntry, image: str, adapter: Builder, note: EventSink, log_path: Path) -> Probe:
    """A built image that cannot start its kernel is a failed build: look into it before it replaces the
    previous image, and find the Python the kernel runs (:mod:`hpc_kernels.imagecheck`)."""
    from hpc_kernels import imagecheck

    note("hpc-kernels: checking that the new image can start the kernel")
    try:
        found = imagecheck.probe(entry, adapter.runner(entry, image))
    except imagecheck.ImageCheckError as exc:
        raise BuildError(entry.name, f"the new image cannot start the kernel: {exc.reason}; {exc.fix} "
                         "(the previous image, if any, is kept)", log_path=str(log_path)) from None
    except imagecheck.ProbeFailed as exc:
        raise BuildError(entry.name, f"the new image could not be started to check it: {exc} "
                         "(the previous image, if any, is kept)", log_path=str(log_path)) from None
    note(f"hpc-kernels: the kernel runs '{found.program}' ('{found.checked}' works in the image)"
         if found.checked != "exists" else f"hpc-kernels: the kernel's program '{found.program}' is in the image")
    return found


def default_builder(entry: KernelEntry) -> Builder:
    """The adapter that builds images for ``entry.runtime``."""
    if entry.runtime == "apptainer":
        from hpc_kernels.errors import RuntimeNotFoundError
        from hpc_kernels.runtimes.apptainer.builder import Apptainer

        try:
            return Apptainer()
        except RuntimeNotFoundError as exc:
            # Kernels fall back to the Apptainer recorded at install time; a build does not: say so.
            raise RuntimeNotFoundError(f"building '{entry.name}' needs Apptainer on PATH (installed kernels can "
                                       f"start without it, builds cannot): {exc}") from None
    if entry.runtime in ("docker", "podman"):
        from hpc_kernels.runtimes.docker.cli import ContainerCLI

        return ContainerCLI(entry.runtime)
    raise HpcKernelsError(f"kernel '{entry.name}': building images for runtime '{entry.runtime}' is not supported yet.")


def build(
    entry: KernelEntry,
    *,
    force: bool = False,
    wait: bool = True,
    builder: Builder | None = None,
    on_line: EventSink = lambda _line: None,
    on_event: EventSink = lambda _msg: None,
    fetch: Fetch | None = None,
    check: bool = True,
) -> BuildResult:
    """Build ``entry``'s image if its inputs changed (or ``force``); atomically; one builder at a time.

    With ``check`` (the default) the new image replaces the old one only when it can start its kernel
    (:func:`verify_image`).

    ``fetch``: where the build takes its base image and Python packages from (default: the registry's
    ``staging:``, :func:`hpc_kernels.staging.default_fetch`); every Apptainer build runs a derived recipe
    (:func:`hpc_kernels.staging.prepare`) that labels the image with what is inside it.
    """
    if not entry.buildable:
        raise BuildError(entry.name, "it has no 'def' recipe in the registry (its image is used as is)")
    # Before anything runs: a header that does not name what the build starts from is refused, and a
    # missing %files source is named (Apptainer would find it only after pulling the base image).
    from hpc_kernels import provenance, recipe, staging

    if entry.recipe is not None:
        recipe.check(entry.recipe)
    check_inputs(entry)
    if entry.runtime in ("docker", "podman"):
        import hpc_kernels.runtimes.docker.cli as docker

        cli = builder if isinstance(builder, docker.ContainerCLI) else None
        import hpc_kernels.runtimes.docker.build as docker_build

        return docker_build.build_image(entry, force=force, wait=wait, cli=cli, on_line=on_line,
                                        on_event=on_event, check=check)
    start = time.monotonic()
    if not force and image_state(entry).status == "built":
        return BuildResult(entry.name, "up-to-date", entry.image, None, time.monotonic() - start)
    image = entry.image
    # A member of a group who may not write the group's images is told so (and who may) before anything.
    from hpc_kernels import group

    group.ensure_writable(image.parent, f"build '{entry.name}' into {image.parent}")

    def waiting(holder: LockRecord | None) -> None:
        who = f" ({holder.describe()})" if holder else ""
        on_event(f"waiting for another build of '{entry.name}' to finish{who}")

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(cluster_lock(lock_path(image), wait=wait, on_wait=waiting))
        except LockBusyError as exc:
            raise BuildBusyError(f"another process is building '{entry.name}' ({image}): {exc.holder}; try "
                                 "again when it is done.") from None
        # The build we waited for may have produced exactly what we want.
        state = image_state(entry)
        if not force and state.status == "built":
            return BuildResult(entry.name, "up-to-date", image, None, time.monotonic() - start)
        if state.status == "foreign":
            raise BuildError(
                entry.name,
                f"{image} exists but was not built by hpc-kernels (no {stamp_path(image).name} beside it); "
                "move it away, or point 'image' elsewhere, so it is not overwritten",
            )
        digest = state.digest
        adapter = builder or default_builder(entry)  # a missing runtime fails here, before any file is written
        # In a group tree, members' commands read the recipe, its %files and the requirement file (to tell
        # whether the image is up to date): a maintainer's editor may have written them 0600.
        inputs = [entry.recipe, *recipe_inputs(entry.recipe)[0]] if entry.recipe is not None else []
        group.publish_inputs(inputs + ([entry.requirements] if entry.requirements is not None else []))
        fetch = fetch or staging.default_fetch(entry)
        try:
            prepared = staging.prepare(entry, digest=digest, build_id=provenance.new_build_id(digest), fetch=fetch,
                                       on_event=on_event)
        except BuildError:
            raise
        except HpcKernelsError as exc:  # staging, requirement files: one sentence, before anything is built
            raise BuildError(entry.name, str(exc).removeprefix(f"kernel '{entry.name}': ")) from None
        for note in prepared.notes:
            on_event(f"note: {note}")
        log_path = paths.private(paths.log_dir()) / f"build-{entry.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log_fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(log_fd, "w", encoding="utf-8") as log:
            log.write(f"# hpc-kernels build of '{entry.name}' from {prepared.labels.get('org.hpc-kernels.recipe')}"
                      f" (derived recipe: {prepared.recipe}; inputs: {fetch.value})\n")

            def line_out(line: str) -> None:
                log.write(line + "\n")
                log.flush()
                on_line(line)

            with build_workspace(entry, line_out) as temp, build_environment(temp):
                try:
                    adapter.build(prepared.recipe, temp.temp_image, build_options(entry), line_out)
                except BuildError as exc:
                    hint = exc.hint or offline_hint(exc.log_tail, entry, staged=prepared.staged is not None)
                    raise BuildError(entry.name, exc.reason, exc.log_tail, str(log_path), hint) from None
                found = verify_image(entry, str(temp.temp_image), adapter, line_out, log_path) if check else None
                if found is None:
                    line_out("hpc-kernels: not checked whether the new image can start its kernel (--no-check)")
                share = share_for(image.parent)
                if share is not None:  # a group's image: readable by the group, whatever the umask
                    share.publish_file(temp.temp_image)
                os.replace(temp.temp_image, image)  # running kernels keep the old inode; the next start gets this
                st = image.stat()
                record = {"digest": digest, "built_at": time.time(), "recipe": str(entry.recipe),
                          "options": build_options(entry), "log": str(log_path), "generator": "hpc-kernels",
                          "size": st.st_size, "mtime_ns": st.st_mtime_ns, **(found.record() if found else {})}
                record.update(provenance.record_fields(prepared, image))
                atomic_write(stamp_path(image), json.dumps(record, indent=1) + "\n")
    return BuildResult(entry.name, "built", image, log_path, time.monotonic() - start)


def lock_path(image: Path) -> Path:
    """The build lock of ``image`` (a :func:`~hpc_kernels.fsutil.cluster_lock`: builds of one image on
    several nodes, by several users of a group, exclude each other)."""
    from hpc_kernels import buildtemp

    return buildtemp.image_lock(image)

