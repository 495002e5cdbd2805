"""Can an image run its kernel? Find the image's Python, and refuse images that cannot start their kernel.

The registry's default command is ``python3 -m ipykernel_launcher ...``, but images differ: Debian/Ubuntu
Pythons have only ``python3``, some conda or custom images only ``python``. So, when the registry gives no
``command``, we look inside the image for ``python3`` then ``python`` with a working ``import ipykernel``
and record the one found:

* for an image we build, right after the build, in the temporary image: a build whose image cannot run
  its kernel fails (the previous image is kept), and the program found goes into the build record beside
  the image (``<image>.hpck.json``, key ``program``);
* for an image given as is (``image:`` without ``def:``), or built by an older hpc-kernels, at install
  time: the result is cached under ``~/.cache/hpc-kernels/probes/`` keyed by the image's path, size and
  modification time (we never write beside an image we did not build).

A registry ``command`` is used as given; a build checks that its program exists in the image and, for a
Python, that the module it runs imports. The kernelspec's command (:func:`kernel_command`) is the
registry's with the recorded program in front. Probes run the image like a kernel does (``--cleanenv``,
the kernel's ``env`` and binds, ``PYTHONNOUSERSITE=1``, so ``~/.local`` packages do not count), without the
binds whose source this node lacks. ``build --no-check`` skips the build-time check.
Only Apptainer images are probed; Docker/Podman kernels run the command as written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths, proc
from hpc_kernels.build import stamps
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.model import KernelEntry, Runtime
from hpc_kernels.runtimes.base import ImageRunner

#: The Pythons looked for, in this order, when the registry gives no command.
PYTHONS = ("python3", "python")
PROBE_TIMEOUT = 180.0

#: Runs ``argv`` inside the image being checked; returns its exit code and output (stderr + stdout).
Runner = ImageRunner
Outcome = Literal["ok", "missing", "import-error", "failed"]


class ImageCheckError(HpcKernelsError):
    """The image cannot run the kernel's command: ``reason`` says what is missing, ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}; {fix}")


class ProbeFailed(HpcKernelsError):
    """The image could not be looked into at all (the container did not start): no verdict on it."""


@dataclass(frozen=True)
class Probe:
    """What a probe found: the kernel's ``program`` and what was checked (``import ipykernel``, ``exists``)."""

    program: str
    checked: str

    def record(self) -> dict[str, str]:
        """The keys a build record (or the probe cache) stores."""
        return {"program": self.program, "program_check": self.checked}


def is_python(program: str) -> bool:
    """``python``, ``python3``, ``python3.12``, ``/opt/conda/bin/python``..."""
    return re.fullmatch(r"python[0-9.]*", os.path.basename(program)) is not None


def command_module(command: Sequence[str]) -> str | None:
    """The module a ``python -m MODULE`` command runs."""
    for i, arg in enumerate(command[:-1]):
        if arg == "-m":
            return command[i + 1]
    return None


def import_code(command: Sequence[str]) -> str:
    """What a Python kernel command must be able to import: ipykernel for ``ipykernel_launcher``."""
    module = command_module(command) or "ipykernel"
    # ipykernel_launcher is a module of the ipykernel distribution; importing ipykernel also catches a
    # broken install (pyzmq missing) that a mere file lookup would not.
    return "import ipykernel" if module in ("ipykernel_launcher", "ipykernel") else f"import {module}"


def classify(returncode: int, output: str) -> Outcome:
    """What running a program in the image told us."""
    if returncode == 0:
        return "ok"
    low = output.lower()
    # Apptainer: '"python": executable file not found in $PATH'; Docker/Podman say much the same.
    if ("executable file" in low and "not found" in low) or "no such file or directory" in low:
        return "missing"
    if "modulenotfounderror" in low or "importerror" in low:
        return "import-error"
    return "failed"


def last_line(text: str) -> str:
    """The last non-empty line of ``text``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def probe(entry: KernelEntry, run: Runner) -> Probe:
    """Check that ``entry``'s image (whatever ``run`` runs in) can start the kernel; what it runs.

    Raises :class:`ImageCheckError` when it cannot (with the fix), :class:`ProbeFailed` when the container
    itself did not start.
    """
    if entry.command_given:
        return _probe_given(entry, run)
    code = import_code(entry.command)
    failures: list[tuple[str, str]] = []
    for program in PYTHONS:
        returncode, output = run([program, "-c", code])
        outcome = classify(returncode, output)
        if outcome == "ok":
            return Probe(program, code)
        if outcome == "failed":
            raise ProbeFailed(f"running '{program}' in the image failed (exit {returncode}): {last_line(output)}")
        if outcome == "import-error":
            failures.append((program, last_line(output)))
    fix_command = (f"or set 'command:' of kernel '{entry.name}' in the registry to the kernel's program "
                   "in the image")
    if not failures:
        raise ImageCheckError(
            f"the image has no Python: neither {' nor '.join(PYTHONS)} is on its PATH",
            f"install Python and ipykernel in the recipe's %post (e.g. 'apt-get install -y python3-ipykernel'), "
            f"{fix_command}")
    program, error = failures[0]
    raise ImageCheckError(
        f"'{program} -c \"{code}\"' fails in the image ({error})",
        f"add '{program} -m pip install ipykernel' (or 'apt-get install -y python3-ipykernel') to the recipe's "
        f"%post, {fix_command}")


def _probe_given(entry: KernelEntry, run: Runner) -> Probe:
    program = entry.command[0]
    fix = (f"set 'command:' of kernel '{entry.name}' in the registry to a program the image has, or install "
           "it in the recipe's %post")
    if is_python(program):
        code = import_code(entry.command)
        returncode, output = run([program, "-c", code])
        outcome = classify(returncode, output)
        if outcome == "ok":
            return Probe(program, code)
        if outcome == "missing":
            raise ImageCheckError(f"the kernel's program '{program}' does not exist in the image", fix)
        if outcome == "import-error":
            raise ImageCheckError(
                f"'{program} -c \"{code}\"' fails in the image ({last_line(output)})",
                f"add '{program} -m pip install {code.split()[-1]}' to the recipe's %post, or {fix[0].lower()}"
                f"{fix[1:]}")
        raise ProbeFailed(f"running '{program}' in the image failed (exit {returncode}): {last_line(output)}")
    # Not a Python: that the program exists is all we can check (through the image's sh; the program name
    # is an argument of the script, never part of it).
    returncode, output = run(["sh", "-c", 'command -v "$1"', "sh", program])
    if returncode == 0:
        return Probe(program, "exists")
    if classify(returncode, output) == "missing":  # the runtime found no sh to run
        raise ProbeFailed("the image has no 'sh' to look for the kernel's program with")
    if returncode in (1, 127):  # command -v: not found (bash says 1, dash 127)
        raise ImageCheckError(f"the kernel's program '{program}' does not exist in the image", fix)
    raise ProbeFailed(f"looking for '{program}' in the image failed (exit {returncode}): {last_line(output)}")


# ----------------------------------------------------------------------------- running images


def probe_spec_runner(entry: KernelEntry, image: str, binary: str, timeout: float = PROBE_TIMEOUT) -> Runner:
    """A :data:`Runner` for Apptainer: ``image`` run under ``entry``'s rules (a kernel's Python may live in a
    bound directory), without the binds whose source this node lacks (a build node may have no /scratch),
    GPU or extra runtime arguments."""

    present = tuple(b for b in entry.binds if _source_here(b))
    # The spec's command is not used: the probe runs its own argv (``container_command``).
    spec = dataclasses.replace(entry.launch_spec(), image=image, binds=present, gpu="none", runtime_args=())

    def run(argv: Sequence[str]) -> tuple[int, str]:
        command, env, _warnings = apptainer.container_command(spec, list(argv), binary, os.environ)
        try:
            result = proc.run(command, check=False, env=env, timeout=timeout)
        except ToolError as exc:  # timed out
            raise ProbeFailed(str(exc)) from None
        return result.returncode, result.stderr + result.stdout

    return run


def _source_here(bind: str) -> bool:
    """Does the source of ``bind`` (``$VARS`` expanded, as the launcher does) exist on this node?"""
    source = os.path.expandvars(bind).split(":", 1)[0]
    return bool(source) and os.path.exists(source)


# ----------------------------------------------------------------------------- records


def _cache_file(image: Path) -> Path:
    key = hashlib.sha256(str(image.absolute()).encode()).hexdigest()[:32]
    return paths.cache_dir() / "probes" / f"{key}.json"


def _identity(image: Path) -> dict[str, object] | None:
    try:
        st = image.stat()
    except OSError:
        return None
    return {"image": str(image.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def recorded(entry: KernelEntry) -> Probe | None:
    """What a probe of ``entry``'s current image found: from the build record, else the probe cache."""
    found: list[dict[str, object]] = []
    stamp = stamps.read_stamp(entry.image) if entry.recipe is not None else None
    if stamp:
        found.append(stamp)
    identity = _identity(entry.image)
    if identity is not None:
        try:
            cached = json.loads(_cache_file(entry.image).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = None
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in identity.items()):
            found.append(cached)
    for data in found:
        program, checked = data.get("program"), data.get("program_check")
        # Data from a file: only a Python we would have found ourselves is taken from it.
        if program in PYTHONS and isinstance(checked, str):
            return Probe(str(program), checked)
    return None


def remember(entry: KernelEntry, found: Probe) -> None:
    """Cache what a probe of ``entry``'s image (one we did not build now) found."""
    identity = _identity(entry.image)
    if identity is not None:
        atomic_write(_cache_file(entry.image), json.dumps({**identity, **found.record()}, indent=1) + "\n")


def kernel_command(entry: KernelEntry) -> tuple[str, ...]:
    """The kernel's command: the registry's, or the default with the Python found in the image."""
    if entry.command_given or entry.runtime != Runtime.APPTAINER:
        return entry.command
    found = recorded(entry)
    return (found.program, *entry.command[1:]) if found else entry.command


def needs_probe(entry: KernelEntry) -> bool:
    """True when ``entry``'s image exists and its Python has not been found yet."""
    return (entry.runtime == Runtime.APPTAINER and not entry.command_given and entry.image.exists()
            and recorded(entry) is None)


def probe_for_install(entry: KernelEntry) -> tuple[Probe | None, str]:
    """At install time: find the Python of an image not probed yet (and cache it); (probe, note).

    Raises :class:`ImageCheckError` when the image cannot run a kernel (nothing is installed then). When the
    image cannot be looked into (no Apptainer here, or the container did not start) the note says so and the
    default command stays.
    """
    if not needs_probe(entry):
        return recorded(entry), ""

    unchecked = f"the kernel runs '{entry.command[0]}'"
    try:
        binary = apptainer.find_binary()
    except RuntimeNotFoundError:
        return None, (f"could not look for the image's Python (no Apptainer on PATH): {unchecked}; load "
                      f"Apptainer and install again if the image has only 'python'")
    try:
        found = probe(entry, probe_spec_runner(entry, str(entry.image), binary))
    except ProbeFailed as exc:
        return None, f"could not look for the image's Python ({exc}): {unchecked}"
    except ImageCheckError as exc:
        raise ImageCheckError(f"kernel '{entry.name}' cannot start in {entry.image}: {exc.reason}", exc.fix) from None
    remember(entry, found)
    return found, ""
