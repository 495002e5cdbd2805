"""Wheelhouses: ``pip download`` for the image's Python and platform into a directory named by its inputs;
the pip wheel; the kernel's lock written from what staging resolved."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import __version__, paths
from hpc_kernels.fsutil import atomic_write, remove_tree
from hpc_kernels.proc import run
from hpc_kernels.runtimes.apptainer.cli import which
from hpc_kernels.staging import requirements
from hpc_kernels.staging.cache import (
    CACHE_FORMAT,
    PIP_TIMEOUT,
    Probe,
    Staged,
    StagingError,
    Wheel,
    Wheelhouse,
    _dir,
    _last_error,
    _not_staged,
    _read_json,
    _sha256,
    cache_root,
)
from hpc_kernels.staging.needs import Needs, inputs_digest, needs

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry
    from hpc_kernels.staging.requirements import Requirements

EventSink = Callable[[str], None]


def normalised_dir(reqs: Requirements | None, extras: Sequence[str] = (), write: bool = True) -> Path:
    """A cache directory holding ``requirements.txt`` (and ``constraints.txt``) as pip is given them; named by
    content, written once (``write=False``: only its name, for a preview)."""
    text = reqs.text if reqs else ""
    constraints = reqs.constraints if reqs else ""
    if constraints:
        text = "-c constraints.txt\n" + text
    text += "".join(f"{extra}\n" for extra in extras)
    key = hashlib.sha256(f"{text}\0{constraints}".encode()).hexdigest()[:32]
    directory = cache_root() / "requirements" / key
    if write and not (directory / "requirements.txt").is_file():
        paths.private(directory)
        if constraints:
            atomic_write(directory / "constraints.txt", constraints)
        atomic_write(directory / "requirements.txt", text)
    return directory


def _wheel_key(need: Needs, probe: Probe, extras: Sequence[str]) -> str:
    h = hashlib.sha256(CACHE_FORMAT.encode())
    specs = [] if need.lock is not None else list(need.post_specs)
    h.update(json.dumps([probe.python, probe.implementation, probe.platforms(), list(extras), specs]).encode())
    for reqs in _downloaded(need):
        h.update(reqs.digest().encode())
    return h.hexdigest()[:32]


def _downloaded(need: Needs) -> list[Requirements]:
    """The requirement files pip downloads for: the lock alone when there is one (it pins everything)."""
    if need.lock is not None and need.own is not None:
        return [need.own]
    return ([need.own] if need.own else []) + list(need.post)


def _wheelhouse(entry: KernelEntry, need: Needs, probe: Probe, extras: Sequence[str], *, online: bool,
                fetched: list[str], on_event: EventSink) -> Wheelhouse:
    key = _wheel_key(need, probe, extras)
    path = _dir("wheels") / key
    manifest = _read_json(path / "hpck-wheels.json")
    if manifest.get("key") == key:
        with contextlib.suppress(TypeError, KeyError):  # a damaged manifest: staged again (or named missing)
            return Wheelhouse(path, key, tuple(Wheel(str(w["file"]), str(w["name"]), str(w["version"]),
                                                     str(w["sha256"])) for w in manifest.get("wheels", [])))
    if path.exists() and online:
        remove_tree(path)  # ours, and damaged: its rename-in would fail
    if not online:
        raise _not_staged(entry, f"the Python packages for Python {probe.python}")
    inputs: list[str] = []
    for reqs in _downloaded(need):
        inputs += ["-r", str(normalised_dir(reqs) / "requirements.txt")]
    if need.lock is None:
        inputs += [*need.post_specs, *extras]
    tmp = path.with_name(f".{key}.tmp-{os.getpid()}")
    on_event(f"downloading the Python packages for Python {probe.python} ({probe.platforms()[0]})")
    try:
        tmp.mkdir(parents=True)
        _pip(["download", "--only-binary=:all:", *_target_args(probe), "--dest", str(tmp), *inputs],
             need, probe, entry)
        wheels = []
        for item in sorted(tmp.iterdir()):
            name, version = _wheel_name(item.name)
            wheels.append(Wheel(item.name, name, version, _sha256(item)))
        atomic_write(tmp / "hpck-install.txt", "".join(f"{w.name}=={w.version}\n" for w in wheels))
        atomic_write(tmp / "hpck-wheels.json", json.dumps({
            "key": key, "python": probe.python, "platforms": probe.platforms(), "created": time.time(),
            "wheels": [w.__dict__ for w in wheels]}, indent=1) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "hpck-wheels.json").is_file():
                raise  # not the race with another stager: a real failure
    finally:
        if tmp.exists():
            remove_tree(tmp)
    fetched.append(f"{len(wheels)} wheel(s)")
    return Wheelhouse(path, key, tuple(wheels))


def _pip_wheel(probe: Probe, *, online: bool, fetched: list[str], on_event: EventSink) -> Path:
    """A pip wheel for the image's Python (installs the requirements in images without pip)."""
    directory = _dir("pip") / probe.python
    found = sorted(directory.glob("pip-*.whl")) if directory.is_dir() else []
    if found:
        return found[-1]
    if not online:
        raise StagingError(f"no pip wheel for Python {probe.python} in the staging cache ({directory}): stage "
                           "the kernel where there is network first ('hpc-kernels build NAME --slurm').")
    tmp = directory.with_name(f".{probe.python}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        on_event(f"downloading pip for Python {probe.python}")
        _pip(["download", "--only-binary=:all:", "--no-deps", "--python-version", probe.python, "--dest", str(tmp),
              "pip"], None, probe, None)
        wheels = sorted(tmp.glob("pip-*.whl"))
        if not wheels:
            raise StagingError(f"pip download found no pip wheel for Python {probe.python}.")
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        if tmp.exists():
            remove_tree(tmp)
    fetched.append("pip")
    return sorted(directory.glob("pip-*.whl"))[-1]


def _target_args(probe: Probe) -> list[str]:
    impl = {"cpython": "cp", "pypy": "pp"}.get(probe.implementation, "py")
    args = ["--python-version", probe.python, "--implementation", impl]
    for tag in probe.platforms():
        args += ["--platform", tag]
    return args


def pip_command() -> list[str]:
    """How this node runs pip: this interpreter's, else ``python3 -m pip`` on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]

    for name in ("python3", "python"):
        found = which(name)
        if found:
            return [found, "-m", "pip"]
    raise StagingError("staging Python packages needs pip on this node, and neither this Python nor python3 has "
                       "it: install pip (e.g. 'module load python' on a DRAC cluster).")


def _pip(args: list[str], need: Needs | None, probe: Probe, entry: KernelEntry | None) -> None:
    argv = [*pip_command(), *args, "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    done = run(argv, check=False, timeout=PIP_TIMEOUT, env={**os.environ, "PIP_REQUIRE_VIRTUALENV": "0"})
    if done.returncode != 0:
        raise StagingError(pip_failure(done.stderr + "\n" + done.stdout, need, probe,
                                       entry.name if entry is not None else ""))


def pip_failure(output: str, need: Needs | None, probe: Probe, kernel: str) -> str:
    """One sentence for a failed ``pip download``: the package and its requirement file's line when pip names
    one, what pip said otherwise."""
    who = f"kernel '{kernel}': " if kernel else ""
    target = f"Python {probe.python} on {probe.platforms()[0]}"
    missing = re.search(r"No matching distribution found for (\S+)", output)
    if missing:
        spec = missing.group(1)
        versions = re.search(r"satisfies the requirement \S+ \(from versions: ([^)]*)\)", output)
        seen = (versions.group(1).strip() if versions else "") or "none"
        if len(seen) > 120:
            seen = "…, " + seen[-100:].split(", ", 1)[-1]
        name = re.split(r"[<>=!~;\[ @]", spec, maxsplit=1)[0]
        where = _requirement_line(need, name)
        ignored = re.search(r"Ignored the following versions that require a different python version: ([^\n]*)",
                            output)
        why = f"; versions for other Pythons: {ignored.group(1)[:150]}" if ignored else ""
        return (f"{who}{where}pip found no wheel of '{spec}' for {target} (versions with wheels: {seen}{why}): "
                "check the name and version; packages published only as source cannot be staged.")
    if "ResolutionImpossible" in output:
        conflict = " ".join(ln.strip() for ln in output.splitlines()
                            if ln.strip().startswith(("The user requested", "The conflict is caused by")))
        return (f"{who}the requirements contradict each other for {target} ({conflict[:300] or 'pip: '}"
                f"{'' if conflict else 'ResolutionImpossible'}): loosen or fix the pins.")
    if "DO NOT MATCH THE HASHES" in output:
        return (f"{who}a downloaded wheel does not match the hash its requirement file pins: the index serves other "
                "files than the lock was made from; build with --lock again if that is expected.")
    if re.search(r"NewConnectionError|Failed to establish a new connection|Could not fetch URL|"
                 r"Temporary failure in name resolution", output):
        return (f"{who}pip could not reach the package index from this node ({_last_error(output)}): stage where "
                "there is network (a login node).")
    return f"{who}pip download failed for {target}: {_last_error(output)}."


def _requirement_line(need: Needs | None, name: str) -> str:
    if need is None:
        return ""
    for reqs in ([need.own] if need.own else []) + list(need.post):
        origin = reqs.where(name)
        if origin is not None:
            return f"{origin[0]}:{origin[1]}: "
    return ""


def _wheel_name(filename: str) -> tuple[str, str]:
    parts = filename[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) < 5:
        raise StagingError(f"pip downloaded {filename}, which is not a wheel; only wheels can be staged.")
    return parts[0].replace("_", "-"), parts[1]




# ----------------------------------------------------------------------------- the lock


def write_lock(entry: KernelEntry, result: Staged, need: Needs | None = None) -> Path:
    """Write ``entry``'s lock (the versions its packages resolved to, and its base's digest) beside the registry."""
    need = need or needs(entry, fresh_lock=True)
    if entry.lock is None:
        raise StagingError(f"kernel '{entry.name}' has no registry file to write a lock beside.")
    if result.wheelhouse is None or result.probe is None:
        raise StagingError(f"kernel '{entry.name}' installs no Python packages hpc-kernels can see (no "
                           "'requirements:', no pip install in the recipe's %post): there is nothing to lock.")
    if entry.lock.exists() and requirements.read_lock(entry.lock) is None:
        raise StagingError(f"{entry.lock} exists and is not a lock hpc-kernels wrote: move it away first.")
    home = entry.lock.parent.parent
    sources = [os.path.relpath(r.path, home) if home in r.path.parents else str(r.path)
               for r in ([need.own_base] if need.own_base else []) + list(need.post)]
    sources += list(need.post_specs) + list(result.extras)
    final = result.final
    text = requirements.lock_text(
        kernel=entry.name, version=__version__, python=result.probe.python, platforms=result.probe.platforms(),
        base=final.shown if final else "", base_digest=final.digest if final else "",
        requirements_digest=inputs_digest(need, result.extras), sources=sources,
        pins=[(w.name, w.version, w.sha256) for w in result.wheelhouse.wheels])
    atomic_write(entry.lock, text)
    # Builds now install from the lock: its wheelhouse holds the very wheels just resolved (linked, not
    # downloaded again).
    _adopt(result.wheelhouse, _wheel_key(needs(entry), result.probe, ()))
    return entry.lock


def _adopt(source: Wheelhouse, key: str) -> None:
    """A wheelhouse named ``key`` holding the wheels of ``source`` (hard links where the filesystem allows)."""
    path = _dir("wheels") / key
    if (path / "hpck-wheels.json").is_file():
        return
    tmp = path.with_name(f".{key}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for name in ("hpck-install.txt", *(w.file for w in source.wheels)):
            try:
                os.link(source.path / name, tmp / name)
            except OSError:
                shutil.copy2(source.path / name, tmp / name)
        manifest = _read_json(source.path / "hpck-wheels.json")
        manifest["key"] = key
        atomic_write(tmp / "hpck-wheels.json", json.dumps(manifest, indent=1) + "\n")
        with contextlib.suppress(OSError):
            os.rename(tmp, path)  # another process adopted it meanwhile: theirs is the same
    finally:
        if tmp.exists():
            remove_tree(tmp)


# ----------------------------------------------------------------------------- the derived recipe
