"""Docker/Podman images as what a build makes: a tag whose labels say what it was built from.

This adapter only reads and builds: the image's state from its digest label (:func:`label_state`), the build
itself (the recipe converted to a Dockerfile, built with the tag and the labels: :func:`build_tagged`), and the
roll-back of the tag when the new image fails its check (:func:`restore`). The lock, the log, the wait, the
image check and the image state are the one build orchestrator's (:mod:`hpc_kernels.build.orchestrator`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels.errors import RuntimeNotFoundError, ToolError
from hpc_kernels.model import default_container_image
from hpc_kernels.proc import run
from hpc_kernels.runtimes.base import LineSink
from hpc_kernels.runtimes.docker.cli import (
    LABEL_BUILT_AT,
    LABEL_DIGEST,
    LABEL_KERNEL,
    ContainerCLI,
    label_args,
)

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry


def image_tag(entry: KernelEntry) -> str:
    """The tag ``entry``'s image has (its ``image:`` when given, else ``localhost/hpc-kernels/NAME:latest``)."""
    return entry.container_image or default_container_image(entry.name)


def label_state(entry: KernelEntry, digest: str, cli: ContainerCLI | None = None) -> tuple[str, str | None,
                                                                                             float | None]:
    """Where ``entry``'s container image stands, from its labels against ``digest`` (of the current inputs):
    its status word, the digest recorded in the image and when it was built."""
    try:
        cli = cli or ContainerCLI(entry.runtime)
        labels = cli.image_labels(image_tag(entry))
    except (RuntimeNotFoundError, ToolError):
        return "no-runtime", None, None
    if entry.recipe is None:
        return "external" if labels is not None else "external-missing", None, None
    if labels is None:
        return "missing", None, None
    recorded = labels.get(LABEL_DIGEST) or None
    built_at = labels.get(LABEL_BUILT_AT)
    return ("built" if recorded == digest else "stale", recorded,
            float(built_at) if built_at and built_at.replace(".", "", 1).isdigit() else None)


def build_tagged(entry: KernelEntry, cli: ContainerCLI, digest: str, log_path: Path,
                 on_line: LineSink) -> tuple[str | None, str | None]:
    """Build ``entry``'s image with ``cli``: tagged (only when the build succeeds: the runtime's own atomicity)
    and labelled with ``digest``; the converted Dockerfile is kept beside the log (``log_path``). Returns the
    IDs of the image the tag named before and after."""
    assert entry.recipe is not None
    tag = image_tag(entry)
    old_id = cli.image_id(tag)
    labels = {LABEL_KERNEL: entry.name, LABEL_DIGEST: digest, LABEL_BUILT_AT: f"{time.time():.0f}"}
    options = ["-t", tag, *label_args(labels)]
    with tempfile.TemporaryDirectory(prefix="hpck-build-") as tmp:
        dockerfile = Path(tmp) / "Dockerfile"
        cli.build(entry.recipe, dockerfile, options, on_line)
        # Keep the converted Dockerfile beside the log: it is what was built.
        shutil.copyfile(dockerfile, log_path.with_suffix(".Dockerfile"))
    return old_id, cli.image_id(tag)


def restore(cli: ContainerCLI, tag: str, old_id: str | None, new_id: str) -> None:
    """A new image that failed its check: the tag goes back to the previous image (or away), the new one goes."""
    if old_id:
        run([cli.binary, "tag", old_id, tag], check=False, timeout=60)
    else:
        run([cli.binary, "rmi", tag], check=False, timeout=120)
    with contextlib.suppress(ToolError):
        cli.remove_dangling(new_id)
