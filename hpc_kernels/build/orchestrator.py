"""The build orchestrator: one locked, logged, checked, atomic build of an image, whatever the runtime.

The adapter of the runtime only builds (:class:`~hpc_kernels.runtimes.base.Builder`); this module takes the
image's lock, writes the log, makes the build's temporary places, checks the new image and records it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import hpc_kernels.runtimes.docker.build as docker_build
from hpc_kernels import group, paths
from hpc_kernels.build import imagecheck, provenance, recipe
from hpc_kernels.build import temp as buildtemp
from hpc_kernels.build.imagecheck import Probe
from hpc_kernels.build.stamps import EventSink, build_options, check_inputs, image_state, recipe_inputs, stamp_path
from hpc_kernels.build.temp import BuildTemp
from hpc_kernels.errors import (
    BuildBusyError,
    BuildError,
    HpcKernelsError,
    LockBusyError,
    RuntimeNotFoundError,
    ToolError,
)
from hpc_kernels.fsutil import atomic_write, open_private, share_for
from hpc_kernels.locks import LockRecord, cluster_lock
from hpc_kernels.model import Fetch, ImageStatus, KernelEntry, Runtime
from hpc_kernels.runtimes.apptainer.builder import Apptainer
from hpc_kernels.runtimes.base import Builder
from hpc_kernels.runtimes.docker.cli import ContainerCLI
from hpc_kernels.staging import cache, prepare


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
    for line in reversed(log_tail.splitlines()):
        if any(p.search(line) for p in OFFLINE_PATTERNS):
            return prepare.offline_hint(entry, line, staged)
    return ""


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
    """The places of one build (:mod:`hpc_kernels.build.temp`), made under the image's lock after sweeping
    what killed builds of the image left; removed afterwards. When the build fails or is interrupted, its
    processes are stopped first (their guard watches the record this cancels)."""
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
    previous image, and find the Python the kernel runs (:mod:`hpc_kernels.build.imagecheck`)."""
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
    if entry.runtime == Runtime.APPTAINER:
        try:
            return Apptainer()
        except RuntimeNotFoundError as exc:
            # Kernels fall back to the Apptainer recorded at install time; a build does not: say so.
            raise RuntimeNotFoundError(f"building '{entry.name}' needs Apptainer on PATH (installed kernels can "
                                       f"start without it, builds cannot): {exc}") from None
    if entry.runtime in (Runtime.DOCKER, Runtime.PODMAN):
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

    The one build path of every runtime: the image's state, its lock (waited for, or :class:`BuildBusyError`),
    the build log, the check and the record are done here; the runtime's adapter only builds. With ``check``
    (the default) the new image replaces the old one only when it can start its kernel (:func:`verify_image`).

    ``fetch``: where the build takes its base image and Python packages from (default: the registry's
    ``staging:``, :func:`hpc_kernels.staging.cache.default_fetch`); every Apptainer build runs a derived recipe
    (:func:`hpc_kernels.staging.prepare.prepare`) that labels the image with what is inside it. Docker and
    Podman build the recipe as written, converted to a Dockerfile, into a tag
    (:mod:`hpc_kernels.runtimes.docker.build`).
    """
    if not entry.buildable:
        raise BuildError(entry.name, "it has no 'def' recipe in the registry (its image is used as is)")
    # Before anything runs: a header that does not name what the build starts from is refused, and a
    # missing %files source is named (Apptainer would find it only after pulling the base image).
    if entry.recipe is not None:
        recipe.check(entry.recipe)
    check_inputs(entry)
    start = time.monotonic()
    cli = _container_cli(entry, builder)  # Docker/Podman: a missing program fails here
    image = Path(docker_build.image_tag(entry)) if cli is not None else entry.image
    status = image_state(entry, cli).status
    if status == ImageStatus.NO_RUNTIME and cli is not None:
        raise BuildError(entry.name, f"{cli.binary} cannot reach its daemon or service (is it running? "
                         "is DOCKER_HOST right?)")
    if not force and status == ImageStatus.BUILT:
        return BuildResult(entry.name, "up-to-date", image, None, time.monotonic() - start)
    if cli is None:
        # A member of a group who may not write the group's images is told so (and who may) before anything.
        group.ensure_writable(image.parent, f"build '{entry.name}' into {image.parent}")
    with _build_lock(entry, image, cli, wait, on_event):
        # The build we waited for may have produced exactly what we want.
        state = image_state(entry, cli)
        if not force and state.status == ImageStatus.BUILT:
            return BuildResult(entry.name, "up-to-date", image, None, time.monotonic() - start)
        if state.status == ImageStatus.FOREIGN:
            raise BuildError(
                entry.name,
                f"{image} exists but was not built by hpc-kernels (no {stamp_path(image).name} beside it); "
                "move it away, or point 'image' elsewhere, so it is not overwritten",
            )
        if cli is not None:
            log_path = _build_tagged(entry, cli, state.digest, on_line, check)
        else:
            log_path = _build_file(entry, state.digest, builder, fetch, on_line, on_event, check)
    return BuildResult(entry.name, "built", image, log_path, time.monotonic() - start)


def _container_cli(entry: KernelEntry, builder: Builder | None) -> ContainerCLI | None:
    """The Docker/Podman CLI that builds ``entry`` (``builder`` when it is one); None for an Apptainer image."""
    if entry.runtime not in (Runtime.DOCKER, Runtime.PODMAN):
        return None
    return builder if isinstance(builder, ContainerCLI) else ContainerCLI(entry.runtime)


@contextlib.contextmanager
def _build_lock(entry: KernelEntry, image: Path, cli: ContainerCLI | None, wait: bool,
                on_event: EventSink) -> Iterator[None]:
    """Hold the build lock of ``image``: waited for (``on_event`` says so once), else :class:`BuildBusyError`.

    An image file's lock lies beside it (builds on several nodes, by several users of a group, exclude each
    other); a Docker/Podman image's in this user's state directory (its images are this user's, or the
    daemon's)."""
    lock = lock_path(image) if cli is None else \
        paths.private(paths.state_dir() / "locks") / f"build-{entry.runtime}-{entry.name}.lock"

    def waiting(holder: LockRecord | None) -> None:
        who = f" ({holder.describe()})" if holder else ""
        on_event(f"waiting for another build of '{entry.name}' to finish{who}")

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(cluster_lock(lock, wait=wait, on_wait=waiting))
        except LockBusyError as exc:
            raise BuildBusyError(f"another process is building '{entry.name}' ({image}): {exc.holder}; try "
                                 "again when it is done.") from None
        yield


def _open_log(entry: KernelEntry) -> tuple[Path, IO[str]]:
    """The build log of one build of ``entry`` (per-user state: private), open for writing."""
    log_path = paths.private(paths.log_dir()) / f"build-{entry.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    return log_path, os.fdopen(fd, "w", encoding="utf-8")


def _tee(log: IO[str], on_line: EventSink) -> EventSink:
    def line_out(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        on_line(line)

    return line_out


def _build_file(entry: KernelEntry, digest: str, builder: Builder | None, fetch: Fetch | None,
                on_line: EventSink, on_event: EventSink, check: bool) -> Path:
    """An image file (Apptainer): the derived recipe built into the build's own temporary image, checked, put
    in place with a rename and recorded beside it. Returns the log's path."""
    image = entry.image
    adapter = builder or default_builder(entry)  # a missing runtime fails here, before any file is written
    # In a group tree, members' commands read the recipe, its %files and the requirement file (to tell
    # whether the image is up to date): a maintainer's editor may have written them 0600.
    inputs = [entry.recipe, *recipe_inputs(entry.recipe)[0]] if entry.recipe is not None else []
    group.publish_inputs(inputs + ([entry.requirements] if entry.requirements is not None else []))
    fetch = fetch or cache.default_fetch(entry)
    try:
        prepared = prepare.prepare(entry, digest=digest, build_id=provenance.new_build_id(digest), fetch=fetch,
                                   on_event=on_event)
    except BuildError:
        raise
    except HpcKernelsError as exc:  # staging, requirement files: one sentence, before anything is built
        raise BuildError(entry.name, str(exc).removeprefix(f"kernel '{entry.name}': ")) from None
    for note in prepared.notes:
        on_event(f"note: {note}")
    log_path, log = _open_log(entry)
    with log:
        log.write(f"# hpc-kernels build of '{entry.name}' from {prepared.labels.get('org.hpc-kernels.recipe')}"
                  f" (derived recipe: {prepared.recipe}; inputs: {fetch.value})\n")
        line_out = _tee(log, on_line)
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
    return log_path


def _build_tagged(entry: KernelEntry, cli: ContainerCLI, digest: str, on_line: EventSink, check: bool) -> Path:
    """A Docker/Podman image: built into its tag by the adapter, checked (a failed check gives the tag back to
    the previous image); the image the tag named before is removed unless a container uses it. Returns the
    log's path."""
    tag = docker_build.image_tag(entry)
    log_path, log = _open_log(entry)
    with log:
        log.write(f"# hpc-kernels build of '{entry.name}' from {entry.recipe} with {cli.binary}\n")
        line_out = _tee(log, on_line)
        try:
            old_id, new_id = docker_build.build_tagged(entry, cli, digest, log_path, line_out)
        except BuildError as exc:
            raise BuildError(entry.name, exc.reason.split("\n", 1)[0], exc.log_tail, str(log_path),
                             exc.hint or offline_hint(exc.log_tail)) from None
        if check and new_id and new_id != old_id:
            _verify_tagged(entry, cli, tag, old_id, new_id, log_path, line_out)
    if old_id and new_id and old_id != new_id:
        with contextlib.suppress(ToolError):
            cli.remove_dangling(old_id)  # the previous build, unless a container still uses it
    return log_path


def _verify_tagged(entry: KernelEntry, cli: ContainerCLI, tag: str, old_id: str | None, new_id: str,
                   log_path: Path, note: EventSink) -> None:
    """A new image that cannot start its kernel is a failed build: the tag goes back to the previous image.

    Docker/Podman kernels run their command as written (no Python is looked for, unlike Apptainer images):
    the default command's ``python3`` must import ipykernel.
    """
    note("hpc-kernels: checking that the new image can start the kernel")
    try:
        imagecheck.probe(dataclasses.replace(entry, command_given=True), cli.runner(entry, new_id))
        return
    except (imagecheck.ImageCheckError, imagecheck.ProbeFailed) as exc:
        problem = exc
    docker_build.restore(cli, tag, old_id, new_id)
    raise BuildError(entry.name, f"the new image cannot start the kernel: {problem} (the previous image, if any, "
                     "is kept)", log_path=str(log_path))


def lock_path(image: Path) -> Path:
    """The build lock of ``image`` (a :func:`~hpc_kernels.locks.cluster_lock`: builds of one image on
    several nodes, by several users of a group, exclude each other)."""
    return buildtemp.image_lock(image)

