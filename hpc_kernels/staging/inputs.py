"""Fetching into the staging cache: base images pulled once per digest, the image's Python asked of the
image itself; what a staged build takes from the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import oci
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.locks import locked
from hpc_kernels.proc import run
from hpc_kernels.runtimes.apptainer.cli import find_binary
from hpc_kernels.staging import requirements
from hpc_kernels.staging.cache import (
    CACHE_FORMAT,
    PROBE_TIMEOUT,
    PULL_TIMEOUT,
    UNSTAGEABLE,
    Base,
    Probe,
    Staged,
    StagingError,
    Wheelhouse,
    _dir,
    _last_error,
    _not_staged,
    _read_json,
)
from hpc_kernels.staging.needs import Needs, Remote, _where, inputs_digest, needs
from hpc_kernels.staging.wheelhouse import _pip_wheel, _wheelhouse

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry

EventSink = Callable[[str], None]


def stage(entry: KernelEntry, *, pull: bool = False, fresh_lock: bool = False,
          on_event: EventSink = lambda _m: None) -> Staged:
    """Fetch what ``entry``'s build needs into the cache (what is there already is reused): network."""
    return _inputs(entry, online=True, pull=pull, fresh_lock=fresh_lock, on_event=on_event)


def staged(entry: KernelEntry) -> Staged:
    """What ``entry``'s staged build takes from the cache; :class:`StagingError` names what is missing."""
    return _inputs(entry, online=False, pull=False, fresh_lock=False, on_event=lambda _m: None)


def _inputs(entry: KernelEntry, *, online: bool, pull: bool, fresh_lock: bool, on_event: EventSink,
            known: Needs | None = None) -> Staged:
    start = time.monotonic()
    need = known or needs(entry, fresh_lock=fresh_lock)
    fetched: list[str] = []
    if need.unstageable:
        agent, line = need.unstageable[0]
        raise StagingError(
            f"{_where(need.source, line)}: 'Bootstrap: {agent}' {UNSTAGEABLE[agent]} during the build, which "
            f"hpc-kernels cannot stage for a build without network: start from an image (Bootstrap: docker or "
            f"localimage), or set 'staging: never' for kernel '{entry.name}' and build where there is network.")
    lock_info = requirements.read_lock(need.lock) if need.lock is not None else None
    bases: list[Base] = []
    for remote in need.remote:
        pinned = ""
        if lock_info is not None and lock_info.base_digest and remote.stage == len(need.stages) - 1:
            if lock_info.base != str(remote.ref):
                raise StagingError(
                    f"the lock {need.lock} was made with the base {lock_info.base}, but kernel '{entry.name}' now "
                    f"starts from {remote.ref}: build with --lock again to resolve for the new base.")
            pinned = lock_info.base_digest
        bases.append(_stage_base(entry, need, remote, online=online, pull=pull, pinned=pinned, fetched=fetched,
                                 on_event=on_event))
    final = _final_base(need, bases)
    probe: Probe | None = None
    wheelhouse: Wheelhouse | None = None
    pip_wheel: Path | None = None
    extras: tuple[str, ...] = ()
    if need.wants_packages:
        if final is None or final.sif is None:
            stage_info = need.stages[-1]
            raise StagingError(
                f"{need.source.shown}: cannot stage Python packages for kernel '{entry.name}': its image's last "
                f"stage starts from 'Bootstrap: {stage_info.get('bootstrap') or '?'}', not an image whose Python "
                "hpc-kernels can ask (use Bootstrap: docker, oras, library or localimage).")
        probe = _probe(final, online=online, on_event=on_event, fetched=fetched)
        if lock_info is not None and lock_info.python and lock_info.python != probe.python:
            raise StagingError(
                f"the lock {need.lock} was made for Python {lock_info.python}, but the base image of kernel "
                f"'{entry.name}' has Python {probe.python}: build with --lock again to resolve for {probe.python}, "
                f"or use a base with Python {lock_info.python}.")
        for reqs in ([need.own] if need.own else []) + list(need.post):
            conflict = requirements.python_conflict(reqs, probe.python)
            if conflict:
                raise StagingError(f"kernel '{entry.name}': {conflict}")
        if lock_info is not None:
            current = inputs_digest(need, extras_for(need, probe))
            if lock_info.requirements_digest and lock_info.requirements_digest != current:
                raise StagingError(
                    f"the lock {need.lock} was written for other requirements than kernel '{entry.name}' has now "
                    f"({_sources(need)} changed since): build with --lock to update the lock, or delete it.")
        extras = () if need.lock is not None else extras_for(need, probe)
        wheelhouse = _wheelhouse(entry, need, probe, extras, online=online, fetched=fetched, on_event=on_event)
        if need.own is not None or extras:
            pip_wheel = _pip_wheel(probe, online=online, fetched=fetched, on_event=on_event)
    return Staged(tuple(bases), final, probe, wheelhouse, pip_wheel, extras, time.monotonic() - start,
                  tuple(fetched))


def _sources(need: Needs) -> str:
    return ", ".join(str(r.path) for r in ([need.own_base] if need.own_base else []) + list(need.post)) \
        or "its recipe"


def extras_for(need: Needs, probe: Probe) -> tuple[str, ...]:
    """What hpc-kernels adds to a generated recipe's packages: ipykernel, when neither the base nor the
    requirements have it."""
    if not need.generated or probe.ipykernel:
        return ()
    if need.own_base is not None and "ipykernel" in need.own_base.names:
        return ()
    return ("ipykernel",)




def _final_base(need: Needs, bases: list[Base]) -> Base | None:
    last = need.stages[-1]
    for base in bases:
        if base.stage == last.index:
            return base
    if last.get("bootstrap").lower() == "localimage" and last.get("from"):
        value = Path(last.get("from")).expanduser()
        path = value if value.is_absolute() else need.source.origin / value
        return Base(last.index, str(path), _local_digest(path), path)
    return None


# ----------------------------------------------------------------------------- bases


def _ref_record(ref: oci.ImageRef) -> Path:
    return _dir("refs") / (hashlib.sha256(str(ref).encode()).hexdigest()[:32] + ".json")


def _base_path(digest: str) -> Path:
    return _dir("bases") / f"{digest.replace(':', '-')}.sif"


def _stage_base(entry: KernelEntry, need: Needs, remote: Remote, *, online: bool, pull: bool, pinned: str,
                fetched: list[str], on_event: EventSink) -> Base:
    ref = remote.ref
    where = need.shown_line(remote.line)
    digest = pinned or ref.digest
    record = _ref_record(ref)
    if not digest and not pull:
        digest = str(_read_json(record).get("digest") or "")
        digest = digest if oci.DIGEST_RE.match(digest) else ""  # a damaged record: looked up again
    if not digest or (pull and not ref.digest and not pinned):
        if not online:
            raise _not_staged(entry, f"the base image {ref} ({where})")
        if ref.transport is oci.Transport.LIBRARY:
            digest = _pull_library(ref, where, on_event, fetched)
        else:
            on_event(f"looking up {ref}")
            try:
                digest = oci.resolve(ref)
            except oci.RegistryError as exc:
                raise StagingError(f"kernel '{entry.name}': {where}: {exc}") from None
        atomic_write(record, json.dumps({"ref": str(ref), "digest": digest, "resolved_at": time.time()}) + "\n",
                     private=True)
    sif = _base_path(digest)
    if not sif.is_file():
        if not online:
            raise _not_staged(entry, f"the base image {ref}@{digest} ({where})")
        _pull(ref.pinned(digest), sif, where, on_event, fetched)
    return Base(remote.stage, str(ref), digest, sif)


def _pull(ref: oci.ImageRef, dest: Path, where: str, on_event: EventSink, fetched: list[str]) -> None:
    """``apptainer pull`` ``ref`` (a pinned reference) into ``dest``, atomically, one puller at a time."""
    with locked(dest.with_name(f".{dest.name}.lock"), private=True):
        if dest.is_file():
            return  # another process pulled it while we waited
        tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}")
        argv = [find_binary(), "pull", "--disable-cache", *(["--no-https"] if ref.insecure else []), str(tmp),
                str(ref)]
        on_event(f"pulling {ref}")
        try:
            done = run(argv, check=False, timeout=PULL_TIMEOUT, env=_apptainer_env())
            if done.returncode != 0 or not tmp.is_file():
                said = _last_error(done.stderr or done.stdout)
                raise StagingError(f"pulling the base image {ref} ({where}) failed: {said}.")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    fetched.append(f"base {ref}")


def _pull_library(ref: oci.ImageRef, where: str, on_event: EventSink, fetched: list[str]) -> str:
    """A library base has no digest lookup: pull it, and name it by the SIF's sha256."""
    tmp = _dir("bases") / f".library-{os.getpid()}.sif"
    try:
        on_event(f"pulling {ref}")
        done = run([find_binary(), "pull", "--disable-cache", str(tmp), str(ref)], check=False,
                   timeout=PULL_TIMEOUT, env=_apptainer_env())
        if done.returncode != 0 or not tmp.is_file():
            raise StagingError(f"pulling the base image {ref} ({where}) failed: "
                               f"{_last_error(done.stderr or done.stdout)}.")
        digest = oci.sif_digest(tmp)
        dest = _base_path(digest)
        if not dest.is_file():
            os.replace(tmp, dest)
        fetched.append(f"base {ref}")
        return digest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _apptainer_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("APPTAINER_BIND", "SINGULARITY_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BINDPATH"):
        env.pop(var, None)
    return env




def _local_digest(path: Path) -> str:
    """sha256 of a local image, remembered by path, size, mtime and inode (hashing GBs once)."""
    try:
        st = path.stat()
    except OSError:
        return ""
    if not path.is_file():
        return ""  # a sandbox directory: no single digest
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[:32]
    record = _dir("local") / f"{key}.json"
    known = _read_json(record)
    if known.get("digest"):
        return str(known["digest"])
    digest = oci.sif_digest(path)
    atomic_write(record, json.dumps({"path": str(path), "digest": digest}) + "\n", private=True)
    return digest


# ----------------------------------------------------------------------------- the image's Python

#: Run by the image's Python: what it is and what it has. Python 2 compatible (to say it is 2).
PROBE = r"""
import json, platform, sys, glob
try:
    import importlib.util as u
    has = lambda m: u.find_spec(m) is not None
except ImportError:
    import imp
    def has(m):
        try:
            imp.find_module(m)
            return True
        except ImportError:
            return False
libc = platform.libc_ver()
musl = bool(glob.glob("/lib/ld-musl-*"))
print(json.dumps({"version": "%d.%d.%d" % tuple(sys.version_info[:3]),
                  "implementation": getattr(getattr(sys, "implementation", None), "name", "cpython"),
                  "machine": platform.machine(), "libc": "musl" if musl else ("glibc" if libc[0] == "glibc" else ""),
                  "libc_version": "" if musl else libc[1], "ipykernel": has("ipykernel"), "pip": has("pip"),
                  "executable": sys.executable}))
"""
_FIND_PYTHON = ('for p in python3 python; do if command -v "$p" >/dev/null 2>&1; then exec "$p" -c "$1"; fi; '
                'done; echo "no python3 or python in the image" >&2; exit 127')


def _probe_from(data: dict[str, Any]) -> Probe:
    """A :class:`Probe` from the probe's JSON (strings and booleans, as :data:`PROBE` prints them)."""
    text = {k: str(data[k]) for k in ("version", "implementation", "machine", "libc", "libc_version", "executable")}
    return Probe(text["version"], text["implementation"], text["machine"], text["libc"], text["libc_version"],
                 bool(data["ipykernel"]), bool(data["pip"]), text["executable"])


def _probe(base: Base, *, online: bool, on_event: EventSink, fetched: list[str]) -> Probe:
    """The Python of ``base``: remembered beside its digest; asked of the image (``apptainer exec``) once."""
    assert base.sif is not None
    record = _dir("probes") / f"{(base.digest or str(base.sif)).replace(':', '-').replace('/', '_')[:100]}.json"
    known = _read_json(record)
    if known.get("format") == CACHE_FORMAT and isinstance(known.get("probe"), dict):
        with contextlib.suppress(TypeError, KeyError):
            return _probe_from(known["probe"])

    argv = [find_binary(), "-q", "exec", "--cleanenv", "--contain", str(base.sif), "/bin/sh", "-c", _FIND_PYTHON,
            "hpck-probe", PROBE]
    on_event(f"asking {base.shown} which Python it has")
    done = run(argv, check=False, timeout=PROBE_TIMEOUT, env=_apptainer_env())
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        probe = _probe_from(data)
    except (ValueError, IndexError, TypeError):
        said = _last_error(done.stderr or done.stdout)
        raise StagingError(f"cannot tell which Python the base image {base.shown} has ('apptainer exec' of it "
                           f"said: {said}); hpc-kernels installs requirements only into images with python3 "
                           "or python.") from None
    if not probe.version.startswith("3."):
        raise StagingError(f"the base image {base.shown} has Python {probe.version}; hpc-kernels installs "
                           "requirements only for Python 3.")
    atomic_write(record, json.dumps({"format": CACHE_FORMAT, "probe": probe.to_json()}) + "\n", private=True)
    fetched.append(f"probe of {base.shown}")
    return probe


# ----------------------------------------------------------------------------- wheels


