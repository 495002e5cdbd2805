"""``kernels.yaml`` → validated, frozen :class:`KernelEntry` objects.

Data is checked once, here, where it enters; everything downstream trusts it. Every problem is
reported with ``file:line``, all of them at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from hpc_kernels import paths
from hpc_kernels.errors import RegistryError, UnknownKernelError, describe_value

# One set of rules for the registry and for the kernel.json the launcher reads (launchspec checks it too).
from hpc_kernels.launchspec import (
    ENV_NAME_RE,
    GPU_CHOICES,
    KERNEL_NAME_RE,
    MODES,
    PASS_ENV_RE,
    RUNTIMES,
    JobRequest,
)
from hpc_kernels.slurm_settings import UNSET, SlurmDefaults, from_mapping, job_from_mapping
from hpc_kernels.staging_settings import Staging

if TYPE_CHECKING:  # image references are parsed only for kernels with `base:` (the registry loads on every command)
    from hpc_kernels import oci

INTERRUPT_MODES = ("signal", "message")
COMPRESSIONS = ("gzip", "lz4", "zstd", "xz", "lzo")
#: The kernel's command when the registry gives none; the Python is the one found in the image
#: (python3, else python: hpc_kernels.build.imagecheck), python3 until an image has been looked into.
DEFAULT_COMMAND = ("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}")
DEFAULT_IDLE_TIMEOUT = 300.0
#: lz4 squashfs: kernels start in ~0.8x the time of gzip (Apptainer's default), images ~+40 %
#: (measured: docs/performance.md).
DEFAULT_COMPRESSION = "lz4"
#: ``python:`` is a Python version written major.minor (the official ``python:<version>-slim`` image).
PYTHON_VERSION_RE = re.compile(r"^3\.\d{1,2}$")

SEARCH_ORDER = "--registry PATH, $HPC_KERNELS_REGISTRY, ./kernels.yaml, then the user config dir"


@dataclass(frozen=True)
class KernelEntry:
    """One kernel of the registry, fully resolved (absolute paths, defaults applied)."""

    name: str
    display_name: str
    language: str
    recipe: Path | None
    image: Path
    runtime: str
    mode: str
    command: tuple[str, ...]
    binds: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    pass_env: tuple[str, ...]
    gpu: str
    interrupt_mode: str
    runtime_args: tuple[str, ...]
    fakeroot: bool
    compression: str
    idle_timeout: float
    container_image: str | None
    line: int
    slurm: SlurmDefaults = UNSET  # kernel's `slurm:` over `defaults: slurm:` (build --slurm)
    origin: Path | None = None  # the registry file that defines it (another one than yours: `extends`)
    #: A job kernel: it runs in a Slurm allocation of its own (docs/job-kernels.md).
    job: JobRequest | None = None
    python: str | None = None  # `python: "3.12"`: the recipe is generated from python:3.12-slim
    base: oci.ImageRef | None = None  # `base:`: the recipe is generated from this image
    requirements: Path | None = None  # requirements.txt, pyproject.toml or a pip-compatible lock
    staging: Staging = Staging.AUTO
    #: True when the registry (the kernel or its defaults) sets ``command``: used as given, never
    #: adapted to the Python found in the image.
    command_given: bool = False

    @property
    def env_dict(self) -> dict[str, str]:
        """``env`` as a dict (kept as sorted pairs so the dataclass stays hashable)."""
        return dict(self.env)

    @property
    def buildable(self) -> bool:
        """hpc-kernels builds its image: it has a ``def`` recipe, or ``python:``/``base:`` to generate one."""
        return self.recipe is not None or self.python is not None or self.base is not None

    @property
    def recipe_origin(self) -> Path:
        """The directory relative paths of the kernel's recipe are read from."""
        if self.recipe is not None:
            return self.recipe.parent
        return self.origin.parent if self.origin is not None else Path.cwd()

    @property
    def lock(self) -> Path | None:
        """Where 'build --lock' writes this kernel's lock (``<registry>.locks/<name>.txt``, beside the registry
        that defines it); builds use it while it exists."""
        if self.origin is None:
            return None
        return self.origin.with_name(f"{self.origin.stem}.locks") / f"{self.name}.txt"


@dataclass(frozen=True)
class Registry:
    """A loaded registry: where it came from and its kernels, in file order."""

    path: Path
    source: str
    kernels: tuple[KernelEntry, ...] = field(default=())
    #: The registry this one extends (``extends:``, a group's): its kernels are here too, except those
    #: this one defines itself (``overridden``: yours win).
    base: Registry | None = None
    overridden: tuple[str, ...] = ()

    def own(self) -> list[KernelEntry]:
        """The kernels this registry file defines itself (not those of the registry it extends)."""
        return [e for e in self.kernels if e.origin in (None, self.path)]

    def origin(self, entry: KernelEntry) -> Path:
        """The registry file that defines ``entry``."""
        return entry.origin or self.path

    def get(self, name: str) -> KernelEntry:
        """The kernel called ``name``; :class:`UnknownKernelError` names the known ones."""
        for entry in self.kernels:
            if entry.name == name:
                return entry
        known = ", ".join(e.name for e in self.kernels) or "none"
        raise UnknownKernelError(f"no kernel named '{name}' in {self.path} (known: {known}).")

    def select(self, names: list[str], all_: bool) -> list[KernelEntry]:
        """The entries named (in the order given), or with ``all_`` every kernel this file defines: those of
        a registry it extends (the group's) are built and installed by that registry's maintainers."""
        if all_:
            return self.own()
        return [self.get(n) for n in names]


# ----------------------------------------------------------------------------- locating


def locate(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """Find the registry file and say which rule found it (see :data:`SEARCH_ORDER`)."""
    if explicit:
        return Path(explicit).expanduser().absolute(), "--registry"
    env = os.environ.get("HPC_KERNELS_REGISTRY")
    if env:
        return Path(env).expanduser().absolute(), "$HPC_KERNELS_REGISTRY"
    here = Path.cwd() / "kernels.yaml"
    if here.is_file():
        return here, "./kernels.yaml"
    user = paths.config_dir() / "kernels.yaml"
    if user.is_file():
        return user, "user config"
    raise RegistryError(
        [
            "no registry found: looked for ./kernels.yaml and "
            f"{user}; pass --registry PATH or set HPC_KERNELS_REGISTRY "
            "(see the example kernels.yaml in the hpc-kernels repository)."
        ]
    )


def load(explicit: str | os.PathLike[str] | None = None) -> Registry:
    """Locate, parse and validate the registry."""
    path, source = locate(explicit)
    return load_file(path, source)


# ----------------------------------------------------------------------------- parsing


class _Map(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    lines: dict[str, int]
    duplicates: list[tuple[Any, int]]  # key and line of a repeated key (the first definition is kept)


try:  # libyaml's parser: a 500-kernel registry parses in 0.015 s instead of 0.1 s (docs/performance.md)
    from yaml import CSafeLoader as _SafeBase
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeBase  # type: ignore[assignment]


class _Loader(_SafeBase):
    pass


class _PyLoader(yaml.SafeLoader):
    """The pure-Python parser, used only to word a syntax error exactly as PyYAML does."""


def _construct_map(loader: Any, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.line = node.start_mark.line + 1
    result.lines = {}
    result.duplicates = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        value = loader.construct_object(value_node, deep=True)
        if key in result:
            result.duplicates.append((key, line))
            # Keep the first definition in place so its own problems are reported at its own lines.
            continue
        result[key] = value
        result.lines[str(key)] = line
    return result


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int | str:
    # YAML 1.1 reads 1:00:00 as the base-60 integer 3600: keep such text (a Slurm time) as written.
    if ":" in str(node.value):
        return str(node.value)
    return int(loader.construct_yaml_int(node))


for _loader in (_Loader, _PyLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
    _loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _parse(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        # libyaml words syntax errors differently: raise PyYAML's (clearer) message for the same line.
        return yaml.load(text, Loader=_PyLoader)


def load_file(path: Path, source: str = "--registry", _chain: tuple[Path, ...] = ()) -> Registry:
    """Parse and validate one registry file (and the one it ``extends``); raise :class:`RegistryError`
    with every problem."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError([f"{path}: registry file not found (found via {source})."]) from None
    except IsADirectoryError:
        raise RegistryError([f"{path}: is a directory, not a registry file (found via {source})."]) from None
    except PermissionError as exc:
        from hpc_kernels.group import explain_unreadable

        why = explain_unreadable(path) or exc.strerror
        raise RegistryError([f"{path}: cannot read the registry (found via {source}): {why}"]) from None
    except OSError as exc:
        raise RegistryError([f"{path}: cannot read the registry: {exc.strerror}."]) from None
    text = decode_text(path, data, "a YAML registry")
    try:
        doc = _parse(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RegistryError([f"{where}: not valid YAML: {exc.problem}."]) from None
    except yaml.reader.ReaderError as exc:
        # A control character (NUL, bell...): the file is not the text it should be. Name the line.
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise RegistryError([f"{path}:{line}: not valid YAML: {exc.reason} (character {exc.character!r}); "
                             "is this really the registry, a text file?"]) from None
    except yaml.YAMLError as exc:
        raise RegistryError([f"{path}: not valid YAML: {exc}."]) from None
    validator = _Validator(path, source)
    reg = validator.registry(doc)
    if validator.extends is None:
        return reg
    return _extend(reg, validator.extends, validator.extends_line, (*_chain, path))


def _extend(reg: Registry, base_path: Path, line: int, chain: tuple[Path, ...]) -> Registry:
    """``reg`` with the kernels of the registry it extends (a group's), its own names winning."""
    if os.path.realpath(base_path) in {os.path.realpath(p) for p in chain}:
        raise RegistryError([f"{reg.path}:{line}: 'extends: {base_path}' makes a loop "
                             f"({' -> '.join(str(p) for p in (*chain, base_path))})."])
    base = load_file(base_path, f"'extends' at {reg.path}:{line}", chain)
    names = {e.name for e in reg.kernels}
    overridden = tuple(e.name for e in base.kernels if e.name in names)
    merged = reg.kernels + tuple(e for e in base.kernels if e.name not in names)
    return Registry(reg.path, reg.source, merged, base=base, overridden=overridden)


def decode_text(path: Path, data: bytes, what: str) -> str:
    """``data`` (the content of ``path``) as UTF-8 text, or a :class:`RegistryError` naming the line of
    the first byte that is not: a Latin-1 file, a binary file, a UTF-16 file saved by an editor."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = data[exc.start : exc.start + 1].hex()
        if b"\0" in data[:8192]:
            why = f"it looks like a binary file, not {what}"
        else:
            why = "save it as UTF-8 (a Latin-1 file converts with 'iconv -f latin1 -t utf-8')"
        raise RegistryError(
            [f"{path}:{line}: not UTF-8 text (byte 0x{byte} at column {column}): {why}."]
        ) from None


_TOP_KEYS = {"defaults", "kernels", "extends"}
# Keys allowed both under `defaults:` and in each kernel.
_SHARED_KEYS = {
    "runtime", "mode", "binds", "env", "pass_env", "gpu", "interrupt_mode", "runtime_args",
    "fakeroot", "compression", "idle_timeout", "language", "command", "slurm", "staging",
}
_DEFAULT_ONLY = {"images_dir"}
_KERNEL_ONLY = {"def", "image", "display_name", "job", "python", "base", "requirements"}


class _Validator:
    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self.base = path.parent
        self.problems: list[str] = []
        self.extends: Path | None = None
        self.extends_line = 0

    def err(self, line: int, text: str) -> None:
        self.problems.append(f"{self.path}:{line}: {text}")

    def registry(self, doc: Any) -> Registry:
        if doc is None:
            doc = _Map()
            doc.line, doc.lines, doc.duplicates = 1, {}, []
        if not isinstance(doc, _Map):
            raise RegistryError(
                [f"{self.path}:1: the registry must be a mapping with 'kernels:' (and optionally 'defaults:')."]
            )
        self._dupes(doc, "top-level key")
        for key in doc:
            if key not in _TOP_KEYS:
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
        defaults = doc.get("defaults") or _empty()
        if not isinstance(defaults, _Map):
            self.err(doc.lines.get("defaults", 1), "'defaults' must be a mapping.")
            defaults = _empty()
        self._dupes(defaults, "key in defaults")
        for key in defaults:
            if key not in _SHARED_KEYS | _DEFAULT_ONLY:
                hint = _hint(key, _SHARED_KEYS | _DEFAULT_ONLY)
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
            kernels_doc = _empty()
        if not isinstance(kernels_doc, _Map):
            self.err(doc.lines.get("kernels", 1), "'kernels' must be a mapping of kernel name to settings.")
            kernels_doc = _empty()
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
        return Registry(self.path, self.source, tuple(entries))

    def _dupes(self, mapping: _Map, what: str) -> None:
        for key, line in mapping.duplicates:
            self.err(line, f"duplicate {what} '{key}'.")

    def _path(self, value: str) -> Path:
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def kernel(self, name: Any, body: Any, line: int, defaults: _Map, images_dir: Path) -> KernelEntry | None:
        before = len(self.problems)
        if not isinstance(name, str) or not KERNEL_NAME_RE.match(name):
            self.err(
                line,
                f"kernel name {name!r} is not valid: Jupyter kernel names use only lowercase letters, "
                "digits, '.', '_' and '-'.",
            )
            name = str(name)
        if body is None:
            body = _empty(line)
        if not isinstance(body, _Map):
            self.err(line, f"kernel '{name}' must be a mapping of settings.")
            return None
        self._dupes(body, f"key in kernel '{name}'")
        for key in body:
            if key not in _SHARED_KEYS | _KERNEL_ONLY:
                hint = _hint(key, _SHARED_KEYS | _KERNEL_ONLY)
                self.err(body.lines[str(key)], f"unknown key '{key}' in kernel '{name}'{hint}.")

        def get(key: str, check: Callable[[Any], bool], expected: str, default: Any) -> Any:
            for source in (body, defaults):
                if key in source:
                    value = source[key]
                    if check(value):
                        return value
                    where = f"kernel '{name}'" if source is body else "defaults"
                    self.err(source.lines[key], f"'{key}' in {where} must be {expected}, not {describe_value(value)}.")
                    return default
            return default

        runtime = get("runtime", lambda v: v in RUNTIMES, f"one of {', '.join(RUNTIMES)}", "apptainer")
        mode = get("mode", lambda v: v in MODES, f"one of {', '.join(MODES)}", "exec")
        gpu = get("gpu", lambda v: v in GPU_CHOICES, f"one of {', '.join(GPU_CHOICES)}", "auto")
        # Shared instances/containers are entered with `exec`, which does not forward signals the way
        # jupyter_client expects (a signal interrupt kills the kernel): message mode is the default there.
        interrupt = get(
            "interrupt_mode", lambda v: v in INTERRUPT_MODES, "signal or message",
            "message" if mode == "instance" else "signal",
        )
        language = get("language", _nonempty_str, "a non-empty string", "python")
        command = tuple(get("command", _str_list, "a non-empty list of strings", list(DEFAULT_COMMAND)))
        if command and "{connection_file}" not in command:
            self.err(_line(body, defaults, "command"),
                     f"'command' of kernel '{name}' must contain the argument '{{connection_file}}'.")
        binds = tuple(get("binds", _str_list_or_empty, "a list of bind specs (src[:dst[:ro]])", []))
        for bind in binds:
            if not bind or bind.count(":") > 2:
                self.err(_line(body, defaults, "binds"),
                         f"bind {bind!r} of kernel '{name}' is not of the form src[:dst[:opts]].")
        env_value = get("env", _str_map, "a mapping of variable name to string", {})
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
        pass_env = tuple(get("pass_env", _str_list_or_empty, "a list of variable names (NAME or PREFIX*)", []))
        for var in pass_env:
            if not PASS_ENV_RE.match(var):
                self.err(_line(body, defaults, "pass_env"),
                         f"pass_env entry {var!r} of kernel '{name}' must be NAME or PREFIX*.")
        runtime_args = tuple(get("runtime_args", _str_list_or_empty, "a list of strings", []))
        fakeroot = get("fakeroot", lambda v: isinstance(v, bool), "true or false", False)
        compression = get("compression", lambda v: v in COMPRESSIONS, f"one of {', '.join(COMPRESSIONS)}",
                          DEFAULT_COMPRESSION)
        idle = get(
            "idle_timeout", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
            "a number of seconds (>= 0)", DEFAULT_IDLE_TIMEOUT,
        )
        display = body.get("display_name", f"{'Python' if language == 'python' else language.title()} ({name})")
        if not _nonempty_str(display):
            self.err(body.lines.get("display_name", line),
                     f"'display_name' of kernel '{name}' must be a non-empty string.")

        staging = Staging(get("staging", lambda v: v in [s.value for s in Staging],
                              f"one of {', '.join(s.value for s in Staging)}", Staging.AUTO.value))
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
        if runtime == "apptainer":
            image = self._path(image_value) if image_value else images_dir / f"{name}.sif"
            if recipe is None and not image_value and python is None and base is None \
                    and "python" not in body and "base" not in body:
                self.err(line, f"kernel '{name}' needs 'def' (a recipe to build), 'python' or 'base' (to build "
                         "from requirement files), or 'image' (an existing .sif).")
        else:
            # docker/podman: `image` names a container image (name:tag); built images get a local tag.
            container_image = image_value or f"localhost/hpc-kernels/{name}:latest"
            image = images_dir / f"{name}.{runtime}"
            if recipe is None and not image_value:
                self.err(line,
                         f"kernel '{name}' needs 'def' (a recipe to build) or 'image' (an existing container image).")
        slurm = self._slurm(name, body, defaults)
        job: JobRequest | None = None
        if "job" in body:
            job = job_from_mapping(body["job"], f"kernel '{name}'", body.lines["job"], self.err, slurm)
            if runtime != "apptainer" or mode != "exec":
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
            runtime=runtime,
            mode=mode,
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

    def _generated(self, name: str, body: _Map, line: int,
                   runtime: str) -> tuple[str | None, oci.ImageRef | None, Path | None]:
        """``python:``, ``base:`` and ``requirements:`` of a kernel, checked together."""
        if not any(k in body for k in ("python", "base", "requirements")):
            return None, None, None
        python: str | None = None
        base: oci.ImageRef | None = None
        requirements: Path | None = None
        given = [k for k in ("python", "base", "requirements") if k in body]
        if given and runtime != "apptainer":
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

    def _slurm(self, name: str, body: _Map, defaults: _Map) -> SlurmDefaults:
        """`slurm:` of the kernel over `slurm:` of defaults, key by key (see hpc_kernels.slurm_settings)."""
        lower = from_mapping(defaults.get("slurm"), "defaults", defaults.lines.get("slurm", 1), self.err)
        own = from_mapping(body.get("slurm"), f"kernel '{name}'", body.lines.get("slurm", body.line), self.err)
        return own.over(lower)


def _empty(line: int = 1) -> _Map:
    m = _Map()
    m.line, m.lines, m.duplicates = line, {}, []
    return m


def _line(body: _Map, defaults: _Map, key: str) -> int:
    return body.lines.get(key) or defaults.lines.get(key) or body.line


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _str_list_or_empty(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(x, (str, int, float, bool)) for x in v.values())



def _hint(key: Any, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
