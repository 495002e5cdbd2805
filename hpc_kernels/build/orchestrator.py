"""The build orchestrator: one locked, logged, checked, atomic build of an image, whatever the runtime.

The adapter of the runtime only builds (:class:`~hpc_kernels.runtimes.base.Builder`); this module takes the
image's lock, writes the log, makes the build's temporary places, checks the new image and records it.
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
from hpc_kernels.build.stamps import EventSink, build_options, check_inputs, image_state, recipe_inputs, stamp_path
from hpc_kernels.staging_settings import Fetch

if TYPE_CHECKING:
    from hpc_kernels.build.temp import BuildTemp
    from hpc_kernels.build.imagecheck import Probe


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
    from hpc_kernels.staging.prepare import offline_hint as hint

    for line in reversed(log_tail.splitlines()):
        if any(p.search(line) for p in OFFLINE_PATTERNS):
            return hint(entry, line, staged)
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
        from hpc_kernels.build import temp as buildtemp

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
    from hpc_kernels.build import temp as buildtemp

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
    from hpc_kernels.build import imagecheck

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
        from hpc_kernels.runtimes.apptainer import Apptainer

        try:
            return Apptainer()
        except RuntimeNotFoundError as exc:
            # Kernels fall back to the Apptainer recorded at install time; a build does not: say so.
            raise RuntimeNotFoundError(f"building '{entry.name}' needs Apptainer on PATH (installed kernels can "
                                       f"start without it, builds cannot): {exc}") from None
    if entry.runtime in ("docker", "podman"):
        from hpc_kernels.runtimes.docker import ContainerCLI

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
    ``staging:``, :func:`hpc_kernels.staging.cache.default_fetch`); every Apptainer build runs a derived recipe
    (:func:`hpc_kernels.staging.prepare.prepare`) that labels the image with what is inside it.
    """
    if not entry.buildable:
        raise BuildError(entry.name, "it has no 'def' recipe in the registry (its image is used as is)")
    # Before anything runs: a header that does not name what the build starts from is refused, and a
    # missing %files source is named (Apptainer would find it only after pulling the base image).
    from hpc_kernels.build import provenance
    from hpc_kernels.build import recipe
    from hpc_kernels.staging import cache, prepare

    if entry.recipe is not None:
        recipe.check(entry.recipe)
    check_inputs(entry)
    if entry.runtime in ("docker", "podman"):
        from hpc_kernels.runtimes import docker
        from hpc_kernels.runtimes.docker import build as docker_build

        cli = builder if isinstance(builder, docker.ContainerCLI) else None
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
    from hpc_kernels.build import temp as buildtemp

    return buildtemp.image_lock(image)

