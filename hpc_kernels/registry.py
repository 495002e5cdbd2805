"""``kernels.yaml`` → a :class:`Registry` of validated, frozen :class:`~hpc_kernels.model.KernelEntry` objects:
finding the file, reading it (YAML that remembers the line of every key), ``extends:``.

Data is checked once, where it enters (:mod:`hpc_kernels.registry_entries`, with the key table of
:mod:`hpc_kernels.keys`); everything downstream trusts it. Every problem is reported with ``file:line``,
all of them at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpc_kernels import paths
from hpc_kernels.errors import RegistryError, UnknownKernelError
from hpc_kernels.model import KernelEntry
from hpc_kernels.registry_entries import LineMap, Validator

SEARCH_ORDER = "--registry PATH, $HPC_KERNELS_REGISTRY, ./kernels.yaml, then the user config dir"


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


try:  # libyaml's parser: a 500-kernel registry parses in 0.015 s instead of 0.1 s (docs/performance.md)
    from yaml import CSafeLoader as _SafeBase
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeBase  # type: ignore[assignment]


class _Loader(_SafeBase):
    pass


class _PyLoader(yaml.SafeLoader):
    """The pure-Python parser, used only to word a syntax error exactly as PyYAML does."""


def _construct_map(loader: Any, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
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
        # why: group (layer 5) finds the group tree for the repair hint; only this error path needs it.
        # It belongs below the registry: the lead moves find_tree/explain_unreadable down (helper buildpkg).
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
    validator = Validator(path)
    reg = Registry(path, source, validator.registry(doc))
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
