"""What a build needs: read from its recipe and the registry (remote bases, requirement files, the
packages its ``%post`` installs with pip), never guessed from a failure."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import oci
from hpc_kernels.build import recipegen
from hpc_kernels.staging import requirements
from hpc_kernels.staging.cache import NETWORK_COMMANDS, UNSTAGEABLE, StagingError

if TYPE_CHECKING:
    from hpc_kernels.build.recipegen import Source, StageInfo
    from hpc_kernels.model import KernelEntry
    from hpc_kernels.staging.requirements import Requirements

EventSink = Callable[[str], None]


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


def inputs_digest(need: Needs, extras: Sequence[str]) -> str:
    """sha256 of what a kernel's packages are resolved from (its requirements, %post's, the extras): a lock
    records it, and is stale when it changes."""
    h = hashlib.sha256()
    for reqs in ([need.own_base] if need.own_base else []) + list(need.post):
        h.update(reqs.digest().encode() + b"\0")
    h.update(json.dumps([list(need.post_specs), list(extras)]).encode())
    return "sha256:" + h.hexdigest()
