"""A parsed registry file → validated, frozen :class:`~hpc_kernels.model.KernelEntry` objects.

Keys and values are checked with the key table (:mod:`hpc_kernels.keys`); what depends on several keys
or on the file system (paths, recipes, image references, ``python:``/``base:``/``requirements:``, a job
kernel's runtime) is checked here. Every problem is one sentence with ``file:line``. No YAML here:
:mod:`hpc_kernels.registry` parses the file into :class:`LineMap` mappings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_kernels import keys, paths
from hpc_kernels.errors import RegistryError, describe_value

# One set of rules for the registry and for the kernel.json the launcher reads (launchspec checks it too).
from hpc_kernels.launchspec import ENV_NAME_RE, KERNEL_NAME_RE, PASS_ENV_RE
from hpc_kernels.model import (
    JobRequest,
    KernelEntry,
    Mode,
    Runtime,
    SlurmSettings,
    Staging,
    default_container_image,
)

if TYPE_CHECKING:  # image references are parsed only for kernels with `base:` (the registry loads on every command)
    from hpc_kernels import oci

#: ``python:`` is a Python version written major.minor (the official ``python:<version>-slim`` image).
PYTHON_VERSION_RE = re.compile(r"^3\.\d{1,2}$")


class LineMap(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict[str, int]
    duplicates: list[tuple[Any, int]]  # key and line of a repeated key (the first definition is kept)


class Validator:
    """Checks one parsed registry file (``path``) and makes its kernel entries; problems collect in ``problems``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.extends: Path | None = None
        self.extends_line = 0

    def err(self, line: int, text: str) -> None:
        """Record a problem at ``line`` of the file."""
        self.problems.append(f"{self.path}:{line}: {text}")

    def registry(self, doc: Any) -> tuple[KernelEntry, ...]:
        """The kernels of the parsed document ``doc``; a :class:`RegistryError` lists every problem."""
        if doc is None:
            doc = LineMap()
            doc.line, doc.lines, doc.duplicates = 1, {}, []
        if not isinstance(doc, LineMap):
            raise RegistryError(
                [f"{self.path}:1: the registry must be a mapping with 'kernels:' (and optionally 'defaults:')."]
            )
        self._dupes(doc, "top-level key")
        for key in doc:
            if key not in keys.names(keys.TOP):
                self.err(doc.lines.get(str(key), doc.line),
                         f"unknown top-level key '{key}' (expected: defaults, kernels, extends).")
        if "extends" in doc:
            value = doc["extends"]
            self.extends_line = doc.lines.get("extends", 1)
            if isinstance(value, str) and value.strip():
                self.extends = self._path(value)
            else:
                self.err(self.extends_line, "'extends' must be the path of another registry (a group's "
                         f"kernels.yaml), not {describe_value(value)}.")
        defaults = doc.get("defaults") or empty()
        if not isinstance(defaults, LineMap):
            self.err(doc.lines.get("defaults", 1), "'defaults' must be a mapping.")
            defaults = empty()
        self._dupes(defaults, "key in defaults")
        for key in defaults:
            if key not in keys.names(keys.DEFAULTS):
                hint = keys.hint(key, keys.names(keys.DEFAULTS))
                self.err(defaults.lines[str(key)], f"unknown key '{key}' in defaults{hint}.")
        images_dir = paths.default_images_dir()
        if "images_dir" in defaults:
            value = defaults["images_dir"]
            if isinstance(value, str) and value:
                images_dir = self._path(value)
            else:
                self.err(defaults.lines["images_dir"], "'images_dir' must be a path string.")
        kernels_doc = doc.get("kernels")
        if kernels_doc is None:
            kernels_doc = empty()
        if not isinstance(kernels_doc, LineMap):
            self.err(doc.lines.get("kernels", 1), "'kernels' must be a mapping of kernel name to settings.")
            kernels_doc = empty()
        self._dupes(kernels_doc, "kernel name")
        entries: list[KernelEntry] = []
        for name, body in kernels_doc.items():
            line = kernels_doc.lines[str(name)]
            entry = self.kernel(name, body, line, defaults, images_dir)
            if entry is not None:
                entries.append(entry)
        if self.problems:
            # A bad value under `defaults:` is seen once per kernel: report it once, in file order.
            unique = list(dict.fromkeys(self.problems))
            unique.sort(key=lambda p: int(p[len(str(self.path)) + 1 :].split(":", 1)[0]))
            raise RegistryError(unique)
        return tuple(entries)

    def _dupes(self, mapping: LineMap, what: str) -> None:
        for key, line in mapping.duplicates:
            self.err(line, f"duplicate {what} '{key}'.")

    def _path(self, value: str) -> Path:
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def kernel(self, name: Any, body: Any, line: int, defaults: LineMap, images_dir: Path) -> KernelEntry | None:
        """The entry of kernel ``name`` (None when it has problems: they are recorded)."""
        before = len(self.problems)
        if not isinstance(name, str) or not KERNEL_NAME_RE.match(name):
            self.err(
                line,
                f"kernel name {name!r} is not valid: Jupyter kernel names use only lowercase letters, "
                "digits, '.', '_' and '-'.",
            )
            name = str(name)
        if body is None:
            body = empty(line)
        if not isinstance(body, LineMap):
            self.err(line, f"kernel '{name}' must be a mapping of settings.")
            return None
        self._dupes(body, f"key in kernel '{name}'")
        for key in body:
            if key not in keys.names(keys.KERNEL):
                hint = keys.hint(key, keys.names(keys.KERNEL))
                self.err(body.lines[str(key)], f"unknown key '{key}' in kernel '{name}'{hint}.")

        def get(key: str, default: Any = None) -> Any:
            """The kernel's value of ``key`` (checked by its row of the key table), else the defaults', else
            the row's default (or ``default``)."""
            row = keys.key(keys.KERNEL, key)
            fallback = row.default if default is None else default
            assert row.check is not None  # keys read here have a check in the table
            for source in (body, defaults):
                if key in source:
                    value = source[key]
                    checked = row.check(value)
                    if checked is not None:
                        return checked
                    where = f"kernel '{name}'" if source is body else "defaults"
                    self.err(source.lines[key],
                             f"'{key}' in {where} must be {row.expected}, not {describe_value(value)}.")
                    return fallback
            return fallback

        runtime = get("runtime")
        mode = get("mode")
        gpu = get("gpu")
        # Shared instances/containers are entered with `exec`, which does not forward signals the way
        # jupyter_client expects (a signal interrupt kills the kernel): message mode is the default there.
        interrupt = get("interrupt_mode", "message" if mode == Mode.INSTANCE else "signal")
        language = get("language")
        command = tuple(get("command"))
        if command and "{connection_file}" not in command:
            self.err(_line(body, defaults, "command"),
                     f"'command' of kernel '{name}' must contain the argument '{{connection_file}}'.")
        binds = tuple(get("binds"))
        for bind in binds:
            if not bind or bind.count(":") > 2:
                self.err(_line(body, defaults, "binds"),
                         f"bind {bind!r} of kernel '{name}' is not of the form src[:dst[:opts]].")
        env_value = get("env")
        env: dict[str, str] = {}
        for key, value in (env_value or {}).items():
            if not ENV_NAME_RE.match(str(key)):
                self.err(_line(body, defaults, "env"),
                         f"environment variable name {key!r} of kernel '{name}' is not valid.")
            if any("\ud800" <= c <= "\udfff" for c in str(value)):  # YAML's "\ud83d\ude42" is two lone halves
                self.err(_line(body, defaults, "env"),
                         f"the value of {key} of kernel '{name}' holds a lone UTF-16 surrogate (a \\uD8xx escape): "
                         "write the character itself, or \\U0001XXXX for characters beyond U+FFFF.")
            env[str(key)] = str(value)
        pass_env = tuple(get("pass_env"))
        for var in pass_env:
            if not PASS_ENV_RE.match(var):
                self.err(_line(body, defaults, "pass_env"),
                         f"pass_env entry {var!r} of kernel '{name}' must be NAME or PREFIX*.")
        runtime_args = tuple(get("runtime_args"))
        fakeroot = get("fakeroot")
        compression = get("compression")
        idle = get("idle_timeout")
        display = body.get("display_name", f"{'Python' if language == 'python' else language.title()} ({name})")
        if not _nonempty_str(display):
            self.err(body.lines.get("display_name", line),
                     f"'display_name' of kernel '{name}' must be a non-empty string.")

        staging = Staging(get("staging"))
        python, base, requirements = self._generated(name, body, line, runtime)
        recipe: Path | None = None
        container_image: str | None = None
        if "def" in body:
            value = body["def"]
            if not _nonempty_str(value):
                self.err(body.lines["def"], f"'def' of kernel '{name}' must be a path to an Apptainer .def recipe.")
            else:
                recipe = self._path(value)
                if not recipe.is_file():
                    self.err(body.lines["def"], f"recipe '{value}' of kernel '{name}' not found (looked for {recipe}).")
        image_value = body.get("image")
        if image_value is not None and not _nonempty_str(image_value):
            self.err(body.lines["image"], f"'image' of kernel '{name}' must be a string.")
            image_value = None
        if runtime == Runtime.APPTAINER:
            image = self._path(image_value) if image_value else images_dir / f"{name}.sif"
            if recipe is None and not image_value and python is None and base is None \
                    and "python" not in body and "base" not in body:
                self.err(line, f"kernel '{name}' needs 'def' (a recipe to build), 'python' or 'base' (to build "
                         "from requirement files), or 'image' (an existing .sif).")
        else:
            # docker/podman: `image` names a container image (name:tag); built images get a local tag.
            container_image = image_value or default_container_image(name)
            image = images_dir / f"{name}.{runtime}"
            if recipe is None and not image_value:
                self.err(line,
                         f"kernel '{name}' needs 'def' (a recipe to build) or 'image' (an existing container image).")
        slurm = self._slurm(name, body, defaults)
        job: JobRequest | None = None
        if "job" in body:
            job = keys.job_from_mapping(body["job"], f"kernel '{name}'", body.lines["job"], self.err, slurm)
            if runtime != Runtime.APPTAINER or mode != Mode.EXEC:
                self.err(body.lines["job"], f"kernel '{name}' cannot run in a Slurm job of its own: 'job' needs "
                                            f"runtime apptainer and mode exec (it has {runtime}, {mode}).")
        if len(self.problems) > before:
            return None
        return KernelEntry(
            name=name,
            display_name=display,
            language=language,
            recipe=recipe,
            image=image,
            runtime=Runtime(runtime),
            mode=Mode(mode),
            command=command,
            binds=binds,
            env=tuple(sorted(env.items())),
            pass_env=pass_env,
            gpu=gpu,
            interrupt_mode=interrupt,
            runtime_args=runtime_args,
            fakeroot=fakeroot,
            compression=compression,
            idle_timeout=float(idle),
            container_image=container_image,
            line=line,
            slurm=slurm,
            origin=self.path,
            job=job,
            python=python,
            base=base,
            requirements=requirements,
            staging=staging,
            command_given="command" in body or "command" in defaults,
        )

    def _generated(self, name: str, body: LineMap, line: int,
                   runtime: str) -> tuple[str | None, oci.ImageRef | None, Path | None]:
        """``python:``, ``base:`` and ``requirements:`` of a kernel, checked together."""
        if not any(k in body for k in ("python", "base", "requirements")):
            return None, None, None
        python: str | None = None
        base: oci.ImageRef | None = None
        requirements: Path | None = None
        given = [k for k in ("python", "base", "requirements") if k in body]
        if given and runtime != Runtime.APPTAINER:
            self.err(body.lines[given[0]], f"'{given[0]}' of kernel '{name}' builds Apptainer images only; "
                     f"kernel '{name}' has runtime '{runtime}' (write a recipe with 'def' instead).")
            return None, None, None
        if "python" in body:
            value = body["python"]
            if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
                self.err(body.lines["python"], f"'python' of kernel '{name}' must be a quoted version such as "
                         f"\"3.12\" (YAML reads {value} as a number, and 3.10 as 3.1).")
            elif not isinstance(value, str) or not PYTHON_VERSION_RE.match(value.strip()):
                self.err(body.lines["python"], f"'python' of kernel '{name}' must be a Python version such as "
                         f"\"3.12\", not {describe_value(value)}.")
            else:
                python = value.strip()
        if "base" in body:
            value = body["base"]
            if not _nonempty_str(value):
                self.err(body.lines["base"], f"'base' of kernel '{name}' must be an image: a reference such as "
                         "python:3.12-slim or docker://..., or the path of a .sif.")
            else:
                base = self._base(name, value.strip(), body.lines["base"])
        if python is not None and "base" in body:
            self.err(body.lines["base"], f"kernel '{name}' has both 'python' and 'base': give one ('python: "
                     "\"3.12\"' means the image python:3.12-slim).")
        if "def" in body and ("python" in body or "base" in body):
            key = "python" if "python" in body else "base"
            self.err(body.lines[key], f"kernel '{name}' has both 'def' and '{key}': a recipe names its own base "
                     f"(Bootstrap:/From:); drop '{key}', or drop 'def' to let hpc-kernels write the recipe.")
        if "requirements" in body:
            value = body["requirements"]
            if not _nonempty_str(value):
                self.err(body.lines["requirements"], f"'requirements' of kernel '{name}' must be the path of a "
                         "requirements.txt, a pyproject.toml or a pip-compatible lock.")
            else:
                requirements = self._path(value)
                if not requirements.is_file():
                    self.err(body.lines["requirements"], f"requirement file '{value}' of kernel '{name}' not found "
                             f"(looked for {requirements}).")
            if not any(k in body for k in ("def", "python", "base")):
                self.err(body.lines["requirements"], f"kernel '{name}' has 'requirements' but nothing to install "
                         "them into: add 'python: \"3.12\"', a 'base' image, or a 'def' recipe.")
        return python, base, requirements

    def _base(self, name: str, value: str, line: int) -> oci.ImageRef | None:
        """A ``base:`` image: a registry or library reference, or a local image (relative to the registry)."""
        # why: oci costs ~5 ms to import, and the registry loads on every command; only `base:` needs it.
        from hpc_kernels import oci

        local = "://" not in value and (value.startswith(("/", ".", "~", "$")) or value.endswith(".sif"))
        if local:
            path = self._path(value)
            if not path.exists():
                self.err(line, f"base image '{value}' of kernel '{name}' not found (looked for {path}).")
                return None
            return oci.ImageRef(oci.Transport.LOCAL, repository=str(path))
        try:
            return oci.parse(value)
        except oci.ImageRefError as exc:
            self.err(line, f"'base' of kernel '{name}': {exc}")
            return None

    def _slurm(self, name: str, body: LineMap, defaults: LineMap) -> SlurmSettings:
        """`slurm:` of the kernel over `slurm:` of defaults, key by key (see hpc_kernels.keys)."""
        lower = keys.slurm_from_mapping(defaults.get("slurm"), "defaults", defaults.lines.get("slurm", 1), self.err)
        own = keys.slurm_from_mapping(body.get("slurm"), f"kernel '{name}'", body.lines.get("slurm", body.line),
                                      self.err)
        return own.over(lower)


def empty(line: int = 1) -> LineMap:
    """An empty mapping that stands at ``line``."""
    m = LineMap()
    m.line, m.lines, m.duplicates = line, {}, []
    return m


def _line(body: LineMap, defaults: LineMap, key: str) -> int:
    return body.lines.get(key) or defaults.lines.get(key) or body.line


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())
