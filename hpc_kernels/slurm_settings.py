"""The ``slurm:`` settings of the registry (under ``defaults:`` and per kernel): validation and merging.

Kept apart from :mod:`hpc_kernels.registry` (which only calls :func:`from_mapping`) and free of
PyYAML, so that :mod:`hpc_kernels.slurm` can use it without loading the registry machinery.
Precedence, highest first: a ``build --slurm`` flag, the kernel's ``slurm:``, ``defaults: slurm:``,
the built-in DRAC defaults of :mod:`hpc_kernels.slurm`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from hpc_kernels.errors import describe_value

#: Defaults that fit DRAC's clusters for one image build; each is overridable (CLI flags, or
#: SBATCH_TIMELIMIT / SBATCH_MEM_PER_NODE, which sbatch prefers to the script's #SBATCH lines).
DEFAULT_TIME = "1:00:00"
DEFAULT_MEM = "4G"
DEFAULT_CPUS = 2

#: The keys of a ``slurm:`` mapping.
KEYS = ("account", "time", "mem", "cpus", "partition", "modules", "extra_args")

#: Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes, days-hours:minutes:seconds.
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
#: --mem: an integer with an optional K/M/G/T unit (megabytes without one).
_MEM_RE = re.compile(r"^([1-9]\d*)([KMGT]?)$", re.I)
_UNIT_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
#: sbatch options hpc-kernels sets itself, or that have a key of their own.
_MANAGED = {
    "--array": "hpc-kernels makes the job array", "-a": "hpc-kernels makes the job array",
    "--output": "hpc-kernels chooses the log file", "-o": "hpc-kernels chooses the log file",
    "--error": "hpc-kernels chooses the log file", "-e": "hpc-kernels chooses the log file",
    "--dependency": "--then-install sets it", "-d": "--then-install sets it",
    "--parsable": "hpc-kernels sets it", "--wrap": "the job runs hpc-kernels' own script",
    "--time": "use the 'time' key", "-t": "use the 'time' key",
    "--mem": "use the 'mem' key",
    "--cpus-per-task": "use the 'cpus' key", "-c": "use the 'cpus' key",
    "--account": "use the 'account' key", "-A": "use the 'account' key",
    "--partition": "use the 'partition' key", "-p": "use the 'partition' key",
}

TIME_FORMATS = 'minutes or [D-]HH:MM:SS, e.g. 60, "1:00:00" or "1-00:00:00"'


@dataclass(frozen=True)
class SlurmDefaults:
    """Slurm settings of one kernel; ``None`` = not set here (a lower level or the built-in decides)."""

    account: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus: int | None = None
    partition: str | None = None
    modules: tuple[str, ...] | None = None
    extra_args: tuple[str, ...] | None = None

    def over(self, lower: SlurmDefaults) -> SlurmDefaults:
        """Key by key: this level's value where it has one, else ``lower``'s."""
        return SlurmDefaults(**{
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(lower, f.name)
            for f in fields(self)
        })


#: No setting at any level (the built-in defaults decide).
UNSET = SlurmDefaults()


def time_minutes(value: str) -> float | None:
    """A Slurm time limit in minutes (``None`` when it is not one of Slurm's formats)."""
    match = _TIME_RE.match(value.strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        return int(days) * 1440 + int(first) * 60 + int(second or 0) + int(third or 0) / 60
    if third is not None:  # hours:minutes:seconds
        return int(first) * 60 + int(second) + int(third) / 60
    if second is not None:  # minutes:seconds
        return int(first) + int(second) / 60
    return float(first)  # minutes


def mem_megabytes(value: str) -> float | None:
    """A ``--mem`` size in megabytes (``None`` when it is not ``<integer>[K|M|G|T]``)."""
    match = _MEM_RE.match(value.strip())
    return int(match.group(1)) * _UNIT_MB[match.group(2).upper()] if match else None


def from_mapping(value: Any, where: str, line: int, err: Callable[[int, str], None]) -> SlurmDefaults:
    """Validate the ``slurm:`` mapping of ``where`` ("defaults" or "kernel 'x'"); report with ``err(line, text)``.

    ``value`` is the parsed mapping; when it knows the line of each key (``value.lines``), problems
    point at that line, else at ``line``.
    """
    if value is None:
        return SlurmDefaults()
    if not isinstance(value, Mapping):
        err(line, f"'slurm' in {where} must be a mapping (keys: {', '.join(KEYS)}), not {describe_value(value)}.")
        return SlurmDefaults()
    lines: Mapping[str, int] = getattr(value, "lines", {})

    def at(key: str) -> int:
        return lines.get(key, line)

    def bad(key: str, expected: str) -> None:
        err(at(key), f"'slurm: {key}' in {where} must be {expected}, not {describe_value(value[key])}.")

    for key in value:
        if key not in KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected: {', '.join(KEYS)})"
            err(at(str(key)), f"unknown key '{key}' in the slurm settings of {where}{hint}.")
    result: dict[str, Any] = {}
    for key in ("account", "partition"):
        if key in value:
            if isinstance(value[key], str) and value[key].strip() and not re.search(r"\s", value[key]):
                result[key] = value[key]
            else:
                bad(key, "a name without spaces")
    if "time" in value:
        raw = value["time"]
        text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if isinstance(text, str) and (time_minutes(text) or 0) > 0:
            result["time"] = text.strip()
        else:
            bad("time", TIME_FORMATS)
    if "mem" in value:
        raw = value["mem"]
        text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if isinstance(text, str) and mem_megabytes(text) is not None:
            result["mem"] = text.strip()
        else:
            bad("mem", 'a size like "4G", "500M" or 4000 (megabytes)')
    if "cpus" in value:
        raw = value["cpus"]
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
            result["cpus"] = raw
        else:
            bad("cpus", "a whole number of CPUs (>= 1)")
    if "modules" in value:
        raw = value["modules"]
        if isinstance(raw, list) and all(isinstance(m, str) and m.strip() and " " not in m for m in raw):
            result["modules"] = tuple(raw)
        else:
            bad("modules", "a list of module names (e.g. [apptainer], or [] to load none)")
    if "extra_args" in value:
        raw = value["extra_args"]
        if isinstance(raw, list) and all(isinstance(a, str) and a.startswith("-") for a in raw):
            managed = [a for a in raw if a.split("=", 1)[0] in _MANAGED]
            for arg in managed:
                err(at("extra_args"), f"'slurm: extra_args' in {where} cannot set {arg.split('=', 1)[0]}: "
                                      f"{_MANAGED[arg.split('=', 1)[0]]}.")
            if not managed:
                result["extra_args"] = tuple(raw)
        else:
            bad("extra_args", 'a list of sbatch options written --name=value (e.g. ["--qos=normal"])')
    return SlurmDefaults(**result)

