"""The registry's keys as one table: for each key, its type, where it may stand (``defaults:``, a kernel,
a ``slurm:`` mapping, a kernel's ``job:``), how its value is checked, what a bad value must be (the error
says it), its built-in default, and a line of help.

:mod:`hpc_kernels.registry` validates ``defaults:`` and each kernel with it; :func:`slurm_from_mapping` and
:func:`job_from_mapping` validate ``slurm:`` and ``job:`` with it, and :func:`slurm_from_flags` checks
``build --slurm``'s flags by the same rules. Standard library only (no YAML): a mapping that knows the line
of each key (``value.lines``) gets its problems reported at that line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hpc_kernels import slurm_settings as rules
from hpc_kernels.errors import UsageError, describe_value
from hpc_kernels.launchspec import GPU_CHOICES
from hpc_kernels.model import UNSET, JobRequest, Mode, Runtime, SlurmFlags, SlurmSettings, Staging

#: Where a key may stand.
TOP = "top"  # the registry's top level
DEFAULTS = "defaults"
KERNEL = "kernel"
SLURM = "slurm"  # a `slurm:` mapping (under defaults or a kernel)
JOB = "job"  # a kernel's `job:` mapping

INTERRUPT_MODES = ("signal", "message")
COMPRESSIONS = ("gzip", "lz4", "zstd", "xz", "lzo")
#: The kernel's command when the registry gives none; the Python is the one found in the image
#: (python3, else python: hpc_kernels.build.imagecheck), python3 until an image has been looked into.
DEFAULT_COMMAND = ("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}")
DEFAULT_IDLE_TIMEOUT = 300.0
#: lz4 squashfs: kernels start in ~0.8x the time of gzip (Apptainer's default), images ~+40 %
#: (measured: docs/performance.md).
DEFAULT_COMPRESSION = "lz4"

#: A check gives the value as used, or None when it is not what ``expected`` says.
Check = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """One key of the registry."""

    name: str
    type: str  # as a user reads it: "string", "list of strings", "mapping", ...
    where: frozenset[str]
    #: The value as used, or None when it is bad. None: the registry checks it with code of its own
    #: (paths, image references, mappings, keys that depend on others).
    check: Check | None
    expected: str  # "must be <expected>, not ..."
    help: str
    default: Any = None


def _choice(words: tuple[str, ...]) -> Check:
    return lambda v: v if isinstance(v, str) and v in words else None


def _nonempty_str(v: Any) -> Any:
    return v if isinstance(v, str) and v.strip() else None


def _str_list(v: Any) -> Any:
    return v if isinstance(v, list) and v and all(isinstance(x, str) for x in v) else None


def _str_list_or_empty(v: Any) -> Any:
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _str_map(v: Any) -> Any:
    return v if isinstance(v, Mapping) and all(isinstance(x, (str, int, float, bool)) for x in v.values()) else None


def _bool(v: Any) -> Any:
    return v if isinstance(v, bool) else None


def _seconds(v: Any) -> Any:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _slurm(key: str) -> Check:
    return lambda v: rules.check(key, v)


def _one_of(words: tuple[str, ...]) -> str:
    return f"one of {', '.join(words)}"


_D, _K = frozenset({DEFAULTS, KERNEL}), frozenset({KERNEL})

#: The Slurm values of ``slurm:`` and ``job:``: type, check, what a value must be, help.
_SLURM_VALUES: dict[str, tuple[str, Check, str, str]] = {
    "account": ("string", _slurm("account"), rules.NAME_RULE, "the Slurm account"),
    "time": ("string", _slurm("time"), rules.TIME_FORMATS, "the time limit"),
    "mem": ("string", _slurm("mem"), 'a size like "4G", "500M" or 4000 (megabytes)', "memory"),
    "cpus": ("int", _slurm("cpus"), "a whole number of CPUs (>= 1)", "CPUs per task"),
    "partition": ("string", _slurm("partition"), rules.NAME_RULE, "the Slurm partition"),
    "modules": ("list of strings", _slurm("modules"), "a list of module names (e.g. [apptainer], or [] to load none)",
                "modules the build job loads"),
    "extra_args": ("list of strings", _slurm("extra_args"), 'a list of sbatch options written --name=value (e.g. '
                   '["--qos=normal"]), without control characters', "more sbatch options"),
    "gpus": ("string", rules.check_gpus, 'a number of GPUs (e.g. 1) or type:count (e.g. "h100:1")',
             "GPUs per node of a job kernel"),
}
_BUILT_IN = {
    SLURM: {"time": rules.DEFAULT_TIME, "mem": rules.DEFAULT_MEM, "cpus": rules.DEFAULT_CPUS},
    JOB: {"time": rules.JOB_DEFAULT_TIME, "mem": rules.JOB_DEFAULT_MEM, "cpus": rules.JOB_DEFAULT_CPUS, "gpus": ""},
}


def _slurm_row(name: str, where: str) -> Key:
    type_, check, expected, help_ = _SLURM_VALUES[name]
    return Key(name, type_, frozenset({where}), check, expected, help_, _BUILT_IN[where].get(name))


#: Every key, in the order its block lists them (hints name the keys of a block in this order).
KEYS: tuple[Key, ...] = (
    Key("defaults", "mapping", frozenset({TOP}), None, "a mapping", "settings every kernel starts from"),
    Key("kernels", "mapping", frozenset({TOP}), None, "a mapping of kernel name to settings", "the kernels"),
    Key("extends", "path", frozenset({TOP}), None, "the path of another registry", "a group's registry to add"),
    Key("runtime", "choice", _D, _choice(Runtime.words()), _one_of(Runtime.words()),
        "the container runtime", Runtime.APPTAINER.value),
    Key("mode", "choice", _D, _choice(Mode.words()), _one_of(Mode.words()),
        "a container per kernel (exec) or a shared one (instance)", Mode.EXEC.value),
    Key("binds", "list of strings", _D, _str_list_or_empty, "a list of bind specs (src[:dst[:ro]])",
        "bind mounts", []),
    Key("env", "mapping", _D, _str_map, "a mapping of variable name to string", "environment variables set", {}),
    Key("pass_env", "list of strings", _D, _str_list_or_empty, "a list of variable names (NAME or PREFIX*)",
        "host variables passed through", []),
    Key("gpu", "choice", _D, _choice(GPU_CHOICES), _one_of(GPU_CHOICES), "GPU flags", GPU_CHOICES[0]),
    Key("interrupt_mode", "choice", _D, _choice(INTERRUPT_MODES), "signal or message",
        "how Jupyter interrupts the kernel (default: message in instance mode)"),
    Key("runtime_args", "list of strings", _D, _str_list_or_empty, "a list of strings",
        "extra arguments of the runtime", []),
    Key("fakeroot", "bool", _D, _bool, "true or false", "build with --fakeroot", False),
    Key("compression", "choice", _D, _choice(COMPRESSIONS), _one_of(COMPRESSIONS),
        "the image's squashfs compression", DEFAULT_COMPRESSION),
    Key("idle_timeout", "number", _D, _seconds, "a number of seconds (>= 0)",
        "how long a shared container outlives its last kernel", DEFAULT_IDLE_TIMEOUT),
    Key("language", "string", _D, _nonempty_str, "a non-empty string", "the kernel's language", "python"),
    Key("command", "list of strings", _D, _str_list, "a non-empty list of strings",
        "the kernel's command, with '{connection_file}'", list(DEFAULT_COMMAND)),
    Key("slurm", "mapping", _D, None, "a mapping", "Slurm settings of 'build --slurm'"),
    Key("staging", "choice", _D, _choice(Staging.words()), _one_of(Staging.words()),
        "when a build's inputs are fetched on this node first", Staging.AUTO.value),
    Key("images_dir", "path", frozenset({DEFAULTS}), None, "a path string", "where built images go"),
    Key("def", "path", _K, None, "a path to an Apptainer .def recipe", "the recipe"),
    Key("image", "string", _K, None, "a string", "the image (.sif path or container image name)"),
    Key("display_name", "string", _K, None, "a non-empty string", "the name Jupyter shows"),
    Key("job", "mapping", _K, None, "a mapping", "run the kernel in a Slurm job of its own"),
    Key("python", "string", _K, None, 'a Python version such as "3.12"', "generate the recipe from python:X-slim"),
    Key("base", "string", _K, None, "an image", "generate the recipe from this image"),
    Key("requirements", "path", _K, None, "a requirement file", "Python packages to install"),
    # `slurm:` (build jobs) and a kernel's `job:` (its own allocation): the same Slurm values, defaults of their own.
    *(_slurm_row(name, SLURM) for name in ("account", "time", "mem", "cpus", "partition", "modules", "extra_args")),
    *(_slurm_row(name, JOB) for name in ("gpus", "time", "mem", "cpus", "account", "partition", "extra_args")),
)

BY_NAME: dict[tuple[str, str], Key] = {(where, k.name): k for k in KEYS for where in k.where}


def names(where: str) -> tuple[str, ...]:
    """The keys allowed in ``where`` (:data:`TOP`, :data:`DEFAULTS`, :data:`KERNEL`, :data:`SLURM`, :data:`JOB`)."""
    return tuple(k.name for k in KEYS if where in k.where)


def key(where: str, name: str) -> Key:
    """The row of key ``name`` in ``where``."""
    return BY_NAME[(where, name)]


def hint(name: Any, known: tuple[str, ...], fallback: str = "") -> str:
    """`` (did you mean 'x'?)`` for a misspelt key, else ``fallback``."""
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else fallback


# ----------------------------------------------------------------------------- slurm: and job:


def _block(value: Mapping[str, Any], block: str, where: str, line: int, err: Callable[[int, str], None],
           managed: Mapping[str, str]) -> dict[str, Any]:
    """The checked values of a ``slurm:`` or ``job:`` mapping (``block``); each problem goes to
    ``err(line, text)``: unknown keys, ``extra_args`` that set what hpc-kernels sets (``managed``), bad values."""
    lines: Mapping[str, int] = getattr(value, "lines", {})
    known = names(block)
    for name in value:
        if name not in known:
            close = hint(name, known, f" (expected: {', '.join(known)})")
            err(lines.get(str(name), line), f"unknown key '{name}' in the {block} settings of {where}{close}.")
    result: dict[str, Any] = {}
    for name in known:
        if name not in value:
            continue
        raw = value[name]
        at = lines.get(name, line)
        if name == "extra_args" and isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            flags = [a.split("=", 1)[0] for a in raw if a.split("=", 1)[0] in managed]
            for flag in flags:
                err(at, f"'{block}: extra_args' in {where} cannot set {flag}: {managed[flag]}.")
            if flags:
                continue
        row = key(block, name)
        assert row.check is not None  # every key of these blocks has a check
        checked = row.check(raw)
        if checked is None:
            err(at, f"'{block}: {name}' in {where} must be {row.expected}, not {describe_value(raw)}.")
        else:
            result[name] = checked
    return result


def slurm_from_mapping(value: Any, where: str, line: int, err: Callable[[int, str], None]) -> SlurmSettings:
    """Validate the ``slurm:`` mapping of ``where`` ("defaults" or "kernel 'x'"); report with ``err(line, text)``.

    ``value`` is the parsed mapping; when it knows the line of each key (``value.lines``), problems
    point at that line, else at ``line``.
    """
    if value is None:
        return SlurmSettings()
    if not isinstance(value, Mapping):
        err(line, f"'slurm' in {where} must be a mapping (keys: {', '.join(names(SLURM))}), "
                  f"not {describe_value(value)}.")
        return SlurmSettings()
    return SlurmSettings(**_block(value, SLURM, where, line, err, rules.MANAGED))


def job_from_mapping(value: Any, where: str, line: int, err: Callable[[int, str], None],
                     slurm: SlurmSettings = UNSET) -> JobRequest:
    """Validate a kernel's ``job:`` mapping.

    Precedence: the ``job:`` key, then (account and partition only) the kernel's ``slurm:`` over
    ``defaults: slurm:`` (``slurm``), then the built-in job defaults. Problems go to ``err(line, text)``
    with the line of the key.
    """
    keys = ", ".join(names(JOB))
    if value is None:
        err(line, f"'job' in {where} is empty: write 'job: {{}}' for the default resources "
                  f"({rules.JOB_DEFAULT_CPUS} CPU, {rules.JOB_DEFAULT_MEM}, {rules.JOB_DEFAULT_TIME}), "
                  f"or give its keys ({keys}).")
        return JobRequest()
    if not isinstance(value, Mapping):
        err(line, f"'job' in {where} must be a mapping (keys: {keys}; {{}} for the defaults), "
                  f"not {describe_value(value)}.")
        return JobRequest()
    got = {**{k.name: k.default for k in KEYS if JOB in k.where and k.default is not None},
           **_block(value, JOB, where, line, err, rules.JOB_MANAGED)}
    return JobRequest(
        time=got["time"], mem=got["mem"], cpus=got["cpus"], gpus=got["gpus"],
        account=got.get("account", slurm.account), partition=got.get("partition", slurm.partition),
        extra_args=tuple(got.get("extra_args", ())),
    )


def slurm_from_flags(**flags: Any) -> SlurmFlags:
    """``build --slurm``'s flags (``account=``, ``time=``…; None = not given), checked by the rules of the
    registry's ``slurm:``. A bad one raises :class:`~hpc_kernels.errors.UsageError` naming the flag."""
    result: dict[str, Any] = {}
    for name, raw in flags.items():
        if raw is None:
            continue
        row = key(SLURM, name)
        checked = row.check(raw) if row.check is not None else None
        if checked is None:
            raise UsageError(f"--{name} must be {row.expected}, not {describe_value(raw)}.")
        result[name] = checked
    return SlurmFlags(**result)
