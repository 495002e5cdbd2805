"""Slurm's values as the registry's ``slurm:`` and ``job:`` and ``build --slurm``'s flags take them: time
limits, memory sizes, names, sbatch options (:func:`check`), and the built-in defaults.

The keys themselves (which key where, what a bad value must be) are rows of :mod:`hpc_kernels.keys`.
Precedence, highest first: a ``build --slurm`` flag, the kernel's ``slurm:``, ``defaults: slurm:``,
the built-in DRAC defaults here.
"""

from __future__ import annotations

import re
from typing import Any

#: Defaults that fit DRAC's clusters for one image build; each is overridable (CLI flags, or
#: SBATCH_TIMELIMIT / SBATCH_MEM_PER_NODE, which sbatch prefers to the script's #SBATCH lines).
DEFAULT_TIME = "1:00:00"
DEFAULT_MEM = "4G"
DEFAULT_CPUS = 2

#: Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes, days-hours:minutes:seconds.
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
#: --mem: an integer with an optional K/M/G/T unit (megabytes without one).
_MEM_RE = re.compile(r"^([1-9]\d*)([KMGT]?)$", re.I)
_UNIT_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
#: sbatch options hpc-kernels sets itself, or that have a key of their own.
MANAGED = {
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

#: Account, partition and module names: they are written on ``#SBATCH`` lines and into the job script,
#: whose parsers treat white space, quotes, backslashes and '#' specially; control characters are
#: never part of a name. (Lmod module names have a '/', partitions may be a comma-separated list.)
_NAME_RE = re.compile(r"[^\s\"'\\#\x00-\x1f\x7f-\x9f-][^\s\"'\\#\x00-\x1f\x7f-\x9f]*")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
NAME_RULE = "a name without spaces, quotes, backslashes, '#' or control characters"


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


def check(key: str, raw: Any) -> Any:
    """The value of slurm setting ``key`` given as ``raw`` (YAML data or a flag's text), or None when it is
    not what its row of :data:`hpc_kernels.keys.KEYS` expects. The one rule for the registry's ``slurm:``
    and ``job:`` and ``build``'s flags."""
    if key in ("account", "partition"):
        return raw if isinstance(raw, str) and _NAME_RE.fullmatch(raw) else None
    if key in ("time", "mem"):
        text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(text, str) or _CONTROL_RE.search(text):
            return None
        ok = (time_minutes(text) or 0) > 0 if key == "time" else mem_megabytes(text) is not None
        return text.strip() if ok else None
    if key == "cpus":
        return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1 else None
    if key == "modules":
        ok = isinstance(raw, (list, tuple)) and all(isinstance(m, str) and _NAME_RE.fullmatch(m) for m in raw)
        return tuple(raw) if ok else None
    if key == "extra_args":
        ok = isinstance(raw, (list, tuple)) and all(
            isinstance(a, str) and a.startswith("-") and not _CONTROL_RE.search(a) for a in raw)
        return tuple(raw) if ok else None
    raise KeyError(key)


# ----------------------------------------------------------------------------- job kernels

#: Built-in resources of a job kernel (``job:``): one CPU for an hour, like a small interactive job.
JOB_DEFAULT_TIME = "1:00:00"
JOB_DEFAULT_MEM = "4G"
JOB_DEFAULT_CPUS = 1

#: sbatch options a job kernel's ``extra_args`` cannot set (hpc-kernels sets them, or a key does).
JOB_MANAGED = {
    **{k: v for k, v in MANAGED.items() if k not in ("--array", "-a", "--dependency", "-d")},
    "--gpus-per-node": "use the 'gpus' key", "--gpus": "use the 'gpus' key", "-G": "use the 'gpus' key",
    "--gres": "use the 'gpus' key", "--job-name": "hpc-kernels names the job", "-J": "hpc-kernels names the job",
    "--signal": "hpc-kernels asks for the time-limit warning itself",
    "--array": "a kernel runs in one job", "-a": "a kernel runs in one job",
    "--dependency": "a kernel's job starts when Slurm can start it",
    "-d": "a kernel's job starts when Slurm can start it",
}

_GPUS_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+:)?[0-9]+$")


def check_gpus(raw: Any) -> str | None:
    """A ``gpus`` value as the text ``--gpus-per-node`` takes ("" for none), or None when it is not one."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw) if raw > 0 else ("" if raw == 0 else None)
    if isinstance(raw, str) and _GPUS_RE.match(raw.strip()):
        return raw.strip()
    return None
