"""Docker/Podman's own build orchestrator: image state from the digest label, one builder at a time
(lock), the build log, the check of a new image (the previous tag comes back when it fails).

Moved verbatim from ``runtimes/docker.py``; the one build orchestrator for every runtime takes it over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels.errors import BuildBusyError, BuildError, RuntimeNotFoundError, ToolError
from hpc_kernels.runtimes.base import LineSink
from hpc_kernels.runtimes.docker import (
    LABEL_BUILT_AT,
    LABEL_DIGEST,
    LABEL_KERNEL,
    LOCAL_PREFIX,
    ContainerCLI,
    label_args,
)

if TYPE_CHECKING:
    from hpc_kernels.build.orchestrator import BuildResult
    from hpc_kernels.build.stamps import ImageState
    from hpc_kernels.registry import KernelEntry


def image_state(entry: KernelEntry, cli: ContainerCLI | None = None) -> ImageState:
    """Where ``entry``'s container image stands: compares the image's digest label with the inputs."""
    from hpc_kernels.build.stamps import ImageState, input_digest

    digest = input_digest(entry) if entry.recipe is not None else ""
    tag = entry.container_image or f"{LOCAL_PREFIX}{entry.name}:latest"
    try:
        cli = cli or ContainerCLI(entry.runtime)
        labels = cli.image_labels(tag)
    except (RuntimeNotFoundError, ToolError):
        return ImageState("no-runtime", digest, None)
    if entry.recipe is None:
        return ImageState("external" if labels is not None else "external-missing", "", None)
    if labels is None:
        return ImageState("missing", digest, None)
    recorded = labels.get(LABEL_DIGEST) or None
    built_at = labels.get(LABEL_BUILT_AT)
    return ImageState("built" if recorded == digest else "stale", digest, recorded,
                      float(built_at) if built_at and built_at.replace(".", "", 1).isdigit() else None)


def build_image(
    entry: KernelEntry, *, force: bool = False, wait: bool = True, cli: ContainerCLI | None = None,
    on_line: LineSink = lambda _line: None, on_event: LineSink = lambda _msg: None, check: bool = True,
) -> BuildResult:
    """Build ``entry``'s container image if its input digest changed (or ``force``); one builder at a time.

    The image is tagged only when the build succeeds (the runtime's own atomicity); the digest goes in
    the ``hpc-kernels.digest`` label, so a no-op build runs one ``image inspect`` and no build.
    """
    from hpc_kernels import paths
    from hpc_kernels.build.orchestrator import BuildResult, offline_hint
    from hpc_kernels.build.stamps import input_digest
    from hpc_kernels.fsutil import locked, open_private

    if entry.recipe is None:
        raise BuildError(entry.name, "it has no 'def' recipe in the registry (its image is used as is)")
    start = time.monotonic()
    cli = cli or ContainerCLI(entry.runtime)
    tag = entry.container_image or f"{LOCAL_PREFIX}{entry.name}:latest"
    status = image_state(entry, cli).status
    if status == "no-runtime":
        raise BuildError(entry.name, f"{cli.binary} cannot reach its daemon or service (is it running? "
                         "is DOCKER_HOST right?)")
    if not force and status == "built":
        return BuildResult(entry.name, "up-to-date", Path(tag), None, time.monotonic() - start)
    lock = paths.state_dir() / "locks" / f"build-{entry.runtime}-{entry.name}.lock"
    with locked(lock, blocking=False, private=True) as held:
        if not held:
            if not wait:
                raise BuildBusyError(f"another process is building '{entry.name}' ({tag}); "
                                     "try again when it is done.")
            on_event(f"waiting for another build of '{entry.name}' to finish")
    with locked(lock, blocking=True, private=True):
        if not force and image_state(entry, cli).status == "built":
            return BuildResult(entry.name, "up-to-date", Path(tag), None, time.monotonic() - start)
        digest = input_digest(entry)
        old_id = cli.image_id(tag)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_path = paths.private(paths.log_dir()) / f"build-{entry.name}-{stamp}.log"
        labels = {LABEL_KERNEL: entry.name, LABEL_DIGEST: digest, LABEL_BUILT_AT: f"{time.time():.0f}"}
        options = ["-t", tag, *label_args(labels)]
        with tempfile.TemporaryDirectory(prefix="hpck-build-") as tmp, \
                os.fdopen(open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w",
                          encoding="utf-8") as log:
            log.write(f"# hpc-kernels build of '{entry.name}' from {entry.recipe} with {cli.binary}\n")

            def line_out(line: str) -> None:
                log.write(line + "\n")
                log.flush()
                on_line(line)

            dockerfile = Path(tmp) / "Dockerfile"
            try:
                cli.build(entry.recipe, dockerfile, options, line_out)
            except BuildError as exc:
                raise BuildError(entry.name, str(exc).split(": ", 1)[-1].split("\n", 1)[0],
                                 exc.log_tail, str(log_path), exc.hint or offline_hint(exc.log_tail)) from None
            # Keep the converted Dockerfile beside the log: it is what was built.
            shutil.copyfile(dockerfile, log_path.with_suffix(".Dockerfile"))
            new_id = cli.image_id(tag)
            if check and new_id and new_id != old_id:
                _verify_or_restore(entry, cli, tag, old_id, new_id, log_path, line_out)
        if old_id and new_id and old_id != new_id:
            with contextlib.suppress(ToolError):
                cli.remove_dangling(old_id)  # the previous build, unless a container still uses it
    return BuildResult(entry.name, "built", Path(tag), log_path, time.monotonic() - start)


def _verify_or_restore(entry: KernelEntry, cli: ContainerCLI, tag: str, old_id: str | None, new_id: str,
                       log_path: Path, note: LineSink) -> None:
    """A new image that cannot start its kernel is a failed build: the tag goes back to the previous image.

    Docker/Podman kernels run their command as written (no Python is looked for, unlike Apptainer images):
    the default command's ``python3`` must import ipykernel.
    """
    import dataclasses

    from hpc_kernels.build import imagecheck
    from hpc_kernels.proc import run

    note("hpc-kernels: checking that the new image can start the kernel")
    try:
        imagecheck.probe(dataclasses.replace(entry, command_given=True), cli.runner(entry, new_id))
        return
    except (imagecheck.ImageCheckError, imagecheck.ProbeFailed) as exc:
        problem = exc
    if old_id:
        run([cli.binary, "tag", old_id, tag], check=False, timeout=60)
    else:
        run([cli.binary, "rmi", tag], check=False, timeout=120)
    with contextlib.suppress(ToolError):
        cli.remove_dangling(new_id)
    raise BuildError(entry.name, f"the new image cannot start the kernel: {problem} (the previous image, if any, "
                     "is kept)", log_path=str(log_path))
