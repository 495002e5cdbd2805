"""Staging: fetch on a node with network (the login node) what a build would fetch, so the build itself
(in a Slurm job on a compute node without internet) needs none.

What a build fetches is read from its recipe and the registry, never guessed from a failure:

- the base of every ``Bootstrap: docker|oras|library`` stage: its tag is resolved to a digest once
  (``build --pull`` asks again), the image pulled once into a SIF named by that digest, and reused;
- the Python packages: the kernel's ``requirements:``, the requirement files and packages the recipe's own
  ``%post`` installs with pip, and ipykernel for a generated recipe whose base lacks it. ``pip download``
  fetches wheels for the base image's Python and platform (asked of the staged image itself) into a
  wheelhouse named by what it holds, reused while those inputs do not change; plus a pip wheel, so an image
  without pip can install them.

A staged build (:data:`Fetch.STAGED`) takes all of that from the cache and nothing from the network: what is
missing is named, with how to stage it. The cache is ``$XDG_CACHE_HOME/hpc-kernels/staging``; every entry
appears whole (written beside, renamed in) or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import oci, paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import atomic_write, locked
from hpc_kernels.staging_settings import Fetch, Staging

if TYPE_CHECKING:
    from hpc_kernels.recipegen import Derivation, Source, StageInfo
    from hpc_kernels.registry import KernelEntry
    from hpc_kernels.requirements import Requirements

EventSink = Callable[[str], None]
CACHE_FORMAT = "hpck-staging-1"
#: How long staging waits for one ``apptainer pull`` / ``pip download`` (large bases, slow mirrors).
PULL_TIMEOUT = 3600.0
PIP_TIMEOUT = 3600.0
PROBE_TIMEOUT = 300.0
#: A build without staging looks up its base's digest this long at most (then builds from the tag).
PIN_TIMEOUT = 10.0
#: Bootstrap agents that download during the build and cannot be staged.
UNSTAGEABLE = {
    "debootstrap": "downloads Debian packages", "yum": "downloads RPM packages", "zypper": "downloads RPM packages",
    "busybox": "downloads busybox", "arch": "downloads Arch packages", "shub": "pulls from Singularity Hub",
    "docker-daemon": "reads the Docker daemon of the node that builds",
}
#: Bootstrap agents whose ``From:`` is a path on this filesystem (made absolute in the derived recipe).
LOCAL_AGENTS = ("localimage", "docker-archive", "oci-archive", "oci")
#: Commands in %post that need the network and that staging cannot serve (reported before a staged build).
NETWORK_COMMANDS = re.compile(r"^(apt-get|apt|yum|dnf|microdnf|apk|zypper|curl|wget|git|conda|mamba|micromamba|"
                              r"npm|cargo|go|Rscript|R)$")


class StagingError(HpcKernelsError):
    """Staging failed, or a staged build lacks an input; ``str(err)`` is one sentence with the fix."""


def default_fetch(entry: KernelEntry) -> Fetch:
    """How a local build of ``entry`` takes its inputs when no flag says (``staging: always`` stages)."""
    return Fetch.STAGE if entry.staging is Staging.ALWAYS else Fetch.NETWORK


def cache_root() -> Path:
    """The staging cache: ``<cache dir>/staging``."""
    return paths.cache_dir() / "staging"


def _dir(name: str) -> Path:
    return paths.private(cache_root() / name)


# ----------------------------------------------------------------------------- what a build needs


@dataclass(frozen=True)
class Remote:
    """A stage whose base comes from a registry or library."""

    stage: int
    ref: oci.ImageRef
    line: int  # of its From: (generated recipes: 0)


@dataclass(frozen=True)
class Needs:
    """What a kernel's build fetches, read from its recipe and the registry (no network)."""

    source: Source
    stages: tuple[StageInfo, ...]
    remote: tuple[Remote, ...]
    unstageable: tuple[tuple[str, int], ...]  # (bootstrap agent, line)
    own: Requirements | None  # what hpc-kernels installs: the kernel's requirements (or its lock)
    own_base: Requirements | None  # the kernel's requirements themselves (the lock's inputs)
    post: tuple[Requirements, ...]  # requirement files the recipe's %post installs with pip
    post_specs: tuple[str, ...]  # packages named on pip command lines of %post
    lock: Path | None  # hpc-kernels' lock of this kernel, when it exists (and is used)
    notes: tuple[str, ...]  # what staging cannot serve (commands of %post that need the network)

    @property
    def wants_packages(self) -> bool:
        """Some Python packages come from an index (or from staged wheels)."""
        return bool(self.own or self.post or self.post_specs or self.generated)

    @property
    def generated(self) -> bool:
        """The recipe is hpc-kernels' own (``python:``/``base:``): ipykernel is added when the base lacks it."""
        return self.source.path is None

    def shown_line(self, line: int) -> str:
        """``recipe:line`` for messages."""
        return f"{self.source.shown}:{line}" if self.source.path is not None and line else self.source.shown


def needs(entry: KernelEntry, *, fresh_lock: bool = False) -> Needs:
    """Read what ``entry``'s build fetches. ``fresh_lock``: ignore the kernel's lock (``--lock`` resolves anew)."""
    from hpc_kernels import recipegen, requirements

    src = recipegen.source(entry)
    stages = recipegen.split(src.text)
    remote: list[Remote] = []
    unstageable: list[tuple[str, int]] = []
    for stage in stages:
        bootstrap = stage.get("bootstrap").lower()
        line = stage.header.get("bootstrap", ("", 0))[1] if src.path is not None else 0
        if bootstrap in oci.STAGEABLE:
            try:
                ref = oci.from_header(bootstrap, stage.get("from"), stage.get("registry"), stage.get("namespace"))
            except oci.ImageRefError as exc:
                raise StagingError(f"{_where(src, stage.header.get('from', ('', line))[1])}: {exc}") from None
            remote.append(Remote(stage.index, ref, stage.header.get("from", ("", line))[1] if src.path else 0))
        elif bootstrap in UNSTAGEABLE:
            unstageable.append((bootstrap, line))
    own_base = requirements.load(entry.requirements) if entry.requirements is not None else None
    post, specs, notes = _post_installs(src, stages)
    lock = entry.lock if entry.lock is not None and entry.lock.is_file() and not fresh_lock else None
    if lock is not None and requirements.read_lock(lock) is None:
        raise StagingError(f"{lock} is not a lock hpc-kernels wrote (its first lines lack "
                           f"'{requirements.LOCK_MARK}'): move it away; 'build --lock' writes a new one.")
    own = requirements.load(lock) if lock is not None else own_base
    return Needs(src, tuple(stages), tuple(remote), tuple(unstageable), own, own_base, tuple(post), tuple(specs),
                 lock, tuple(notes))


def _where(src: Source, line: int) -> str:
    return f"{src.shown}:{line}" if src.path is not None and line else src.shown


#: Options of ``pip install`` that take a value (so the value is not read as a package).
_PIP_VALUE_OPTIONS = {
    "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-t", "--target",
    "--prefix", "--root", "--src", "--upgrade-strategy", "--python-version", "--platform", "--implementation",
    "--abi", "--only-binary", "--no-binary", "--progress-bar", "--log", "--proxy", "--retries", "--timeout",
    "--cache-dir", "--trusted-host", "--cert", "--client-cert", "--exists-action", "--global-option",
    "--config-settings", "-C", "--report", "--root-user-action", "--python", "-e", "--editable", "--install-option",
    "--use-feature", "--use-deprecated", "--log-file", "--group",
}
_SPEC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._ -]*\])?([<>=!~;@].*)?$")


def _post_installs(src: Source, stages: Sequence[StageInfo]) -> tuple[list[Requirements], list[str], list[str]]:
    """The requirement files (mapped back to the host through ``%files``) and packages that ``pip install``
    lines of every ``%post`` name; notes for what needs the network and cannot be staged."""
    from hpc_kernels import recipegen, requirements

    lines = src.text.splitlines()
    found: list[Requirements] = []
    specs: list[str] = []
    notes: list[str] = []
    for stage in stages:
        files: list[tuple[Path, str]] = []
        posts: list[tuple[int, str]] = []
        for name, begin, end in recipegen.sections(lines, stage.body, stage.end):
            if name == "%files":
                for raw in lines[begin:end]:
                    try:
                        words = shlex.split(raw)
                    except ValueError:
                        continue
                    if words and not words[0].startswith("#"):
                        host = Path(words[0]).expanduser()
                        host = host if host.is_absolute() else src.origin / host
                        files.append((host, words[1] if len(words) > 1 else words[0]))
            elif name.split()[0] == "%post":
                posts += _logical(lines, begin, end)
        for number, command in posts:
            for words in _commands(command):
                program = os.path.basename(words[0])
                if NETWORK_COMMANDS.match(program):
                    notes.append(f"{_where(src, number)}: %post runs '{program}', which needs the network")
                args = _pip_install_args(words)
                if args is None:
                    continue
                files_named, named = _pip_args(args)
                for container_path in files_named:
                    mapped = _host_path(container_path, files)
                    if mapped is None or not mapped.is_file():
                        notes.append(f"{_where(src, number)}: pip installs from {container_path}, which no %files "
                                     "line copies in from this node (hpc-kernels cannot stage what it holds)")
                        continue
                    found.append(requirements.load(mapped))
                specs += named
    return found, list(dict.fromkeys(specs)), list(dict.fromkeys(notes))


def _logical(lines: Sequence[str], begin: int, end: int) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for i in range(begin, end):
        raw = lines[i].strip()
        if not pending:
            start = i + 1
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append((start, text))
    return out


def _commands(line: str) -> list[list[str]]:
    found: list[list[str]] = []
    for part in re.split(r"&&|\|\||;|\|", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        while words and (("=" in words[0] and not words[0].startswith("-")) or words[0] in ("sudo", "env", "exec")):
            words = words[1:]  # VAR=value prefixes, sudo, env
        if words:
            found.append(words)
    return found


def _pip_install_args(words: list[str]) -> list[str] | None:
    """The arguments after ``install`` of a pip command line (``pip``, ``pip3.11``, ``python -m pip``), else None."""
    program = os.path.basename(words[0])
    rest: list[str]
    if re.match(r"^pip(\d+(\.\d+)?)?$", program):
        rest = words[1:]
    elif re.match(r"^python(\d+(\.\d+)?)?$", program) and words[1:3] == ["-m", "pip"]:
        rest = words[3:]
    else:
        return None
    while rest and rest[0].startswith("-"):  # global options before the subcommand (-q, --no-cache-dir)
        rest = rest[1:]
    return rest[1:] if rest and rest[0] == "install" else None


def _pip_args(args: list[str]) -> tuple[list[str], list[str]]:
    files: list[str] = []
    specs: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word in ("-r", "--requirement") and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
            continue
        if word.startswith("--requirement="):
            files.append(word.split("=", 1)[1])
        elif word in _PIP_VALUE_OPTIONS:
            i += 1
        elif not word.startswith("-") and "$" not in word and "://" not in word and _SPEC_RE.match(word) \
                and not word.endswith((".whl", ".tar.gz", ".zip")):
            specs.append(word)
        i += 1
    return files, specs


def _host_path(container: str, files: list[tuple[Path, str]]) -> Path | None:
    """The host file that ``%files`` copies to ``container`` (a file to a path, or into a directory)."""
    for host, dest in files:
        dest = dest.rstrip("/") or "/"
        if container == dest:
            return host if not host.is_dir() else None
        if container.startswith(dest + "/"):
            rest = container[len(dest) + 1:]
            candidate = host / rest if host.is_dir() else None
            if candidate is not None:
                return candidate
            if host.name == rest:  # `%files a.txt /build/` copies a.txt into /build
                return host
    return None


# ----------------------------------------------------------------------------- staged inputs


@dataclass(frozen=True)
class Probe:
    """What Python a base image has, asked of the image itself."""

    version: str  # 3.11.2
    implementation: str  # cpython
    machine: str  # x86_64
    libc: str  # glibc | musl | ""
    libc_version: str  # 2.36
    ipykernel: bool
    pip: bool
    executable: str

    @property
    def python(self) -> str:
        """``3.11``."""
        return ".".join(self.version.split(".")[:2])

    def platforms(self) -> list[str]:
        """The wheel platform tags this image accepts, best first (pip takes several ``--platform``)."""
        arch = self.machine
        if self.libc == "glibc" and re.match(r"^2\.\d+$", self.libc_version):
            minor = int(self.libc_version.split(".")[1])
            tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)]
            if arch in ("x86_64", "i686", "aarch64", "ppc64le", "s390x"):
                tags.append(f"manylinux2014_{arch}")  # pip adds manylinux2010 and manylinux1 itself
            return tags
        if self.libc == "musl":
            return [f"musllinux_1_{n}_{arch}" for n in (2, 1)]
        return [f"linux_{arch}"]

    def to_json(self) -> dict[str, Any]:
        """For the cache."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Base:
    """A base as a build uses it."""

    stage: int
    shown: str  # docker://docker.io/library/python:3.12-slim, a path
    digest: str  # sha256:... ("" when unknown)
    sif: Path | None  # the staged SIF (registry bases), or the local image


@dataclass(frozen=True)
class Wheel:
    """One staged wheel."""

    file: str
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Wheelhouse:
    """Wheels pip downloaded for one set of requirements, Python and platform."""

    path: Path
    key: str
    wheels: tuple[Wheel, ...]


@dataclass(frozen=True)
class Staged:
    """Everything a staged build of a kernel takes from the cache."""

    bases: tuple[Base, ...]  # the registry bases, staged as SIFs
    final: Base | None  # the base of the image (its last stage), for labels
    probe: Probe | None
    wheelhouse: Wheelhouse | None
    pip_wheel: Path | None
    extras: tuple[str, ...]  # packages added by hpc-kernels (ipykernel)
    seconds: float = 0.0
    fetched: tuple[str, ...] = field(default=(), compare=False)  # what this staging downloaded (empty: all cached)


def stage(entry: KernelEntry, *, pull: bool = False, fresh_lock: bool = False,
          on_event: EventSink = lambda _m: None) -> Staged:
    """Fetch what ``entry``'s build needs into the cache (what is there already is reused): network."""
    return _inputs(entry, online=True, pull=pull, fresh_lock=fresh_lock, on_event=on_event)


def staged(entry: KernelEntry) -> Staged:
    """What ``entry``'s staged build takes from the cache; :class:`StagingError` names what is missing."""
    return _inputs(entry, online=False, pull=False, fresh_lock=False, on_event=lambda _m: None)


def _inputs(entry: KernelEntry, *, online: bool, pull: bool, fresh_lock: bool, on_event: EventSink,
            known: Needs | None = None) -> Staged:
    from hpc_kernels import requirements

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


def inputs_digest(need: Needs, extras: Sequence[str]) -> str:
    """sha256 of what a kernel's packages are resolved from (its requirements, %post's, the extras): a lock
    records it, and is stale when it changes."""
    h = hashlib.sha256()
    for reqs in ([need.own_base] if need.own_base else []) + list(need.post):
        h.update(reqs.digest().encode() + b"\0")
    h.update(json.dumps([list(need.post_specs), list(extras)]).encode())
    return "sha256:" + h.hexdigest()


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
    from hpc_kernels.proc import run
    from hpc_kernels.runtimes.apptainer.cli import find_binary

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
        from hpc_kernels.proc import run
        from hpc_kernels.runtimes.apptainer.cli import find_binary

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


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("FATAL", "ERROR"))]
    line = (fatal or lines or ["no output"])[-1]
    return re.sub(r"^(FATAL|ERROR):\s*", "", line)[:300]


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
    from hpc_kernels.proc import run
    from hpc_kernels.runtimes.apptainer.cli import find_binary

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
        from hpc_kernels.fsutil import remove_tree

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
            from hpc_kernels.fsutil import remove_tree

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
            from hpc_kernels.fsutil import remove_tree

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
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    from hpc_kernels.runtimes.apptainer.cli import which

    for name in ("python3", "python"):
        found = which(name)
        if found:
            return [found, "-m", "pip"]
    raise StagingError("staging Python packages needs pip on this node, and neither this Python nor python3 has "
                       "it: install pip (e.g. 'module load python' on a DRAC cluster).")


def _pip(args: list[str], need: Needs | None, probe: Probe, entry: KernelEntry | None) -> None:
    from hpc_kernels.proc import run

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _not_staged(entry: KernelEntry, what: str) -> StagingError:
    return StagingError(
        f"kernel '{entry.name}' builds from staged inputs only (no network here), and {what} is not in the "
        "staging cache: "
        f"stage it on a node with internet (a login node) with 'hpc-kernels build {entry.name} --slurm', which "
        "stages before it submits the job.")


# ----------------------------------------------------------------------------- the lock


def write_lock(entry: KernelEntry, result: Staged, need: Needs | None = None) -> Path:
    """Write ``entry``'s lock (the versions its packages resolved to, and its base's digest) beside the registry."""
    from hpc_kernels import __version__, requirements

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
    import shutil

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
            from hpc_kernels.fsutil import remove_tree

            remove_tree(tmp)


# ----------------------------------------------------------------------------- the derived recipe


@dataclass(frozen=True)
class Prepared:
    """The recipe one build runs, and what its image will say about itself."""

    recipe: Path
    text: str
    fetch: Fetch
    labels: dict[str, str]
    staged: Staged | None
    notes: tuple[str, ...] = ()


def digest_parts(entry: KernelEntry) -> list[bytes]:
    """What the input digest covers besides a ``def`` recipe and its %files: the recipe hpc-kernels generates,
    the requirement files and the kernel's lock. Best effort (``list`` digests every kernel): never raises."""
    from hpc_kernels import recipegen, requirements

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


def prepare(entry: KernelEntry, *, digest: str, build_id: str, fetch: Fetch,
            on_event: EventSink = lambda _m: None, pull: bool = False) -> Prepared:
    """Write the derived recipe of one build into the cache (staging first with :data:`Fetch.STAGE`)."""
    from hpc_kernels import recipegen

    need = needs(entry)
    result: Staged | None = None
    pins: dict[int, str] = {}
    notes: list[str] = []
    if fetch is Fetch.NETWORK:
        final_digest = ""
        for remote in need.remote:
            pin = _pin(entry, need, remote, on_event)
            if pin:
                pins[remote.stage] = str(remote.ref.pinned(pin)).split("://", 1)[1]
                if remote.stage == len(need.stages) - 1:
                    final_digest = pin
        final = _final_base(need, [Base(r.stage, str(r.ref), final_digest, None) for r in need.remote])
    else:
        result = _inputs(entry, online=fetch is Fetch.STAGE, pull=pull, fresh_lock=False, on_event=on_event,
                         known=need)
        final = result.final
        notes = [f"{n}; a staged build has none" for n in need.notes]
    labels = _labels(entry, need, digest=digest, build_id=build_id, final=final, staged=result is not None)
    how = derivation(entry, need, result, labels, pins)
    text = recipegen.derive(need.source, how)
    # One file per image (builds of an image hold its lock): the record of its last build points to it.
    key = hashlib.sha256(str(entry.image).encode()).hexdigest()[:12]
    path = _dir("recipes") / f"{entry.name}-{key}.def"
    atomic_write(path, text)
    return Prepared(path, text, fetch, labels, result, tuple(notes))


def preview(entry: KernelEntry, *, staged_inputs: bool = False) -> str:
    """The recipe a build of ``entry`` runs (``show --recipe``, ``build --slurm --dry-run``), without network:
    from the staging cache with ``staged_inputs``, else as a build without staging (its base as written)."""
    from hpc_kernels import recipegen
    from hpc_kernels.build import input_digest

    need = needs(entry)
    result = _inputs(entry, online=False, pull=False, fresh_lock=False, on_event=lambda _m: None, known=need) \
        if staged_inputs else None
    final = result.final if result is not None else \
        _final_base(need, [Base(r.stage, str(r.ref), r.ref.digest, None) for r in need.remote])
    labels = _labels(entry, need, digest=input_digest(entry), build_id="(set by each build)", final=final,
                     staged=result is not None)
    return recipegen.derive(need.source, derivation(entry, need, result, labels, write=False))


def _pin(entry: KernelEntry, need: Needs, remote: Remote, on_event: EventSink) -> str:
    """Without staging: the digest a registry base's tag points to now (one HEAD request), so the image can say
    which base it has. Best effort: a registry that cannot be reached or wants a login (Apptainer may have
    one) leaves the reference as written, and Apptainer's own pull says what is wrong; only a registry that
    answers that the image does not exist stops the build here, in one sentence."""
    if remote.ref.transport is oci.Transport.LIBRARY:
        return ""
    if remote.ref.digest:
        return remote.ref.digest
    if os.environ.get("HPC_KERNELS_NO_LOOKUP"):
        # No request at all (an air-gapped node that must not even try; the test suite, which addresses
        # nothing beyond loopback): the image then names its base as written, without a digest.
        return ""
    on_event(f"looking up {remote.ref}")
    try:
        return oci.resolve(remote.ref, timeout=PIN_TIMEOUT)
    except oci.RegistryError as exc:
        if exc.kind == "not-found":
            from hpc_kernels.errors import BuildError

            raise BuildError(entry.name, f"{need.shown_line(remote.line)}: {exc}") from None
        on_event(f"note: could not look up the digest of {remote.ref} ({str(exc).rstrip('.')}); the image's "
                 "labels will not name its base's digest")
        return ""


def offline_hint(entry: KernelEntry | None, said: str, staged: bool = False) -> str:
    """What to do about a build that could not reach the network (``said``: the line that says so)."""
    name = entry.name if entry is not None else "NAME"
    if staged:
        return (f"this build ran from staged inputs, without network (the log says: {said.strip()[:200]}), but the "
                "recipe itself reaches the network: hpc-kernels stages the base image and the Python packages "
                "pip installs, not what other %post commands (apt-get, curl, git...) download; do those in the "
                "base image instead, or set 'staging: never' and build where there is network.")
    return (f"this node could not reach the network (the log says: {said.strip()[:200]}). Compute nodes of Narval "
            "and Rorqual have no internet: let hpc-kernels stage the inputs on the login node and build offline "
            f"in the job: 'hpc-kernels build {name} --slurm' does when the registry's 'staging:' is 'auto' (the "
            "default) or 'always' ('always' also stages local builds); this kernel builds with "
            f"'staging: {entry.staging.value if entry is not None else 'never'}' (README: \"Compute nodes without "
            "internet\").")


def derivation(entry: KernelEntry, need: Needs, result: Staged | None, labels: dict[str, str],
               pins: dict[int, str] | None = None, write: bool = True) -> Derivation:
    """How :func:`recipegen.derive` turns ``entry``'s recipe into the one a build runs."""
    from hpc_kernels import recipegen

    pythons = tuple(dict.fromkeys([*([entry.command[0]] if _plain_program(entry.command[0]) else []),
                                   "python3", "python"]))
    label_items = tuple(labels.items())
    if result is not None:
        install = None
        if result.wheelhouse is not None and (need.own is not None or result.extras):
            install = recipegen.Install(True, result.wheelhouse.path, recipegen.INSTALL_FILE, result.pip_wheel)
        return recipegen.Derivation(
            label_items, bases={b.stage: b.sif for b in result.bases if b.sif is not None}, offline=True,
            wheels=result.wheelhouse.path if result.wheelhouse else None, install=install, pythons=pythons)
    install = None
    if need.own is not None or need.generated:
        from hpc_kernels import requirements

        lock_python = requirements.read_lock(need.lock).python if need.lock else None  # type: ignore[union-attr]
        python = lock_python or (need.own.python if need.own else None)
        ipykernel = need.generated and need.lock is None and not (need.own and "ipykernel" in need.own.names)
        directory = normalised_dir(need.own, write=write)
        install = recipegen.Install(False, directory, "requirements.txt" if need.own else "", None, python,
                                    ipykernel)
    return recipegen.Derivation(label_items, pins=pins or {}, install=install, pythons=pythons)


def _plain_program(word: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9_./+-]+$", word)) and "{" not in word


def _labels(entry: KernelEntry, need: Needs, *, digest: str, build_id: str, final: Base | None,
            staged: bool) -> dict[str, str]:
    from hpc_kernels import __version__
    from hpc_kernels.recipegen import Label

    labels = {
        Label.VERSION.value: __version__,
        Label.BUILD_ID.value: build_id,
        Label.INPUTS_DIGEST.value: f"sha256:{digest}" if digest and ":" not in digest else digest,
        Label.RECIPE.value: need.source.shown,
        Label.RECIPE_DIGEST.value: "sha256:" + hashlib.sha256(need.source.text.encode()).hexdigest(),
        Label.BASE.value: final.shown if final else (need.stages[-1].get("bootstrap") or "none"),
        Label.BASE_DIGEST.value: (final.digest if final and final.digest else "unknown"),
        Label.STAGED.value: "yes" if staged else "no",
    }
    if need.own_base is not None:
        labels[Label.REQUIREMENTS.value] = str(need.own_base.path)
        labels[Label.REQUIREMENTS_DIGEST.value] = "sha256:" + need.own_base.digest()
    if need.lock is not None:
        labels[Label.LOCK.value] = f"{need.lock} sha256:{_sha256(need.lock)}"
    return labels
