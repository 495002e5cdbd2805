"""The ``slurm:`` settings of the registry (under ``defaults:`` and per kernel): validation and merging.

Kept apart from :mod:`hpc_kernels.registry` (which only calls :func:`from_mapping`) and free of
PyYAML, so that :mod:`hpc_kernels.slurm` can use it without loading the registry machinery.
Precedence, highest first: a ``build --slurm`` flag, the kernel's ``slurm:``, ``defaults: slurm:``,
the built-in DRAC defaults of :mod:`hpc_kernels.slurm`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from hpc_kernels.errors import UsageError, describe_value
from hpc_kernels.model import UNSET, JobRequest, SlurmFlags, SlurmSettings

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

#: Account, partition and module names: they are written on ``#SBATCH`` lines and into the job script,
#: whose parsers treat white space, quotes, backslashes and '#' specially; control characters are
#: never part of a name. (Lmod module names have a '/', partitions may be a comma-separated list.)
_NAME_RE = re.compile(r"[^\s\"'\\#\x00-\x1f\x7f-\x9f-][^\s\"'\\#\x00-\x1f\x7f-\x9f]*")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
NAME_RULE = "a name without spaces, quotes, backslashes, '#' or control characters"

#: What each key must be, as error messages say it.
EXPECTED = {
    "account": NAME_RULE,
    "partition": NAME_RULE,
    "time": TIME_FORMATS,
    "mem": 'a size like "4G", "500M" or 4000 (megabytes)',
    "cpus": "a whole number of CPUs (>= 1)",
    "modules": "a list of module names (e.g. [apptainer], or [] to load none)",
    "extra_args": 'a list of sbatch options written --name=value (e.g. ["--qos=normal"]), without control '
                  "characters",
}


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
    """The value of slurm setting ``key`` given as ``raw`` (YAML data or a flag's text), or None when it
    is not what :data:`EXPECTED` says. The one rule for the registry's ``slurm:`` and ``build``'s flags."""
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


def from_flags(**flags: Any) -> SlurmFlags:
    """``build --slurm``'s flags (``account=``, ``time=``…; None = not given), checked by :func:`check`.

    A bad one raises :class:`~hpc_kernels.errors.UsageError` naming the flag.
    """
    result: dict[str, Any] = {}
    for key, raw in flags.items():
        if raw is None:
            continue
        checked = check(key, raw)
        if checked is None:
            raise UsageError(f"--{key} must be {EXPECTED[key]}, not {describe_value(raw)}.")
        result[key] = checked
    return SlurmFlags(**result)


def from_mapping(value: Any, where: str, line: int, err: Callable[[int, str], None]) -> SlurmSettings:
    """Validate the ``slurm:`` mapping of ``where`` ("defaults" or "kernel 'x'"); report with ``err(line, text)``.

    ``value`` is the parsed mapping; when it knows the line of each key (``value.lines``), problems
    point at that line, else at ``line``.
    """
    if value is None:
        return SlurmSettings()
    if not isinstance(value, Mapping):
        err(line, f"'slurm' in {where} must be a mapping (keys: {', '.join(KEYS)}), not {describe_value(value)}.")
        return SlurmSettings()
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
    for key in KEYS:
        if key not in value:
            continue
        if key == "extra_args":
            raw = value[key]
            if isinstance(raw, list) and all(isinstance(a, str) for a in raw):
                managed = [a for a in raw if a.split("=", 1)[0] in _MANAGED]
                for arg in managed:
                    err(at("extra_args"), f"'slurm: extra_args' in {where} cannot set {arg.split('=', 1)[0]}: "
                                          f"{_MANAGED[arg.split('=', 1)[0]]}.")
                if managed:
                    continue
        checked = check(key, value[key])
        if checked is None:
            bad(key, EXPECTED[key])
        else:
            result[key] = checked
    return SlurmSettings(**result)



# ----------------------------------------------------------------------------- job kernels

#: Built-in resources of a job kernel (``job:``): one CPU for an hour, like a small interactive job.
JOB_DEFAULT_TIME = "1:00:00"
JOB_DEFAULT_MEM = "4G"
JOB_DEFAULT_CPUS = 1

#: sbatch options a job kernel's ``extra_args`` cannot set (hpc-kernels sets them, or a key does).
_JOB_MANAGED = {
    **{k: v for k, v in _MANAGED.items() if k not in ("--array", "-a", "--dependency", "-d")},
    "--gpus-per-node": "use the 'gpus' key", "--gpus": "use the 'gpus' key", "-G": "use the 'gpus' key",
    "--gres": "use the 'gpus' key", "--job-name": "hpc-kernels names the job", "-J": "hpc-kernels names the job",
    "--signal": "hpc-kernels asks for the time-limit warning itself",
    "--array": "a kernel runs in one job", "-a": "a kernel runs in one job",
    "--dependency": "a kernel's job starts when Slurm can start it",
    "-d": "a kernel's job starts when Slurm can start it",
}

JOB_EXPECTED = {
    **EXPECTED,
    "gpus": 'a number of GPUs (e.g. 1) or type:count (e.g. "h100:1")',
}
JOB_KEYS = ("gpus", "time", "mem", "cpus", "account", "partition", "extra_args")
_GPUS_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+:)?[0-9]+$")


def check_gpus(raw: Any) -> str | None:
    """A ``gpus`` value as the text ``--gpus-per-node`` takes ("" for none), or None when it is not one."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw) if raw > 0 else ("" if raw == 0 else None)
    if isinstance(raw, str) and _GPUS_RE.match(raw.strip()):
        return raw.strip()
    return None


def job_from_mapping(value: Any, where: str, line: int, err: Callable[[int, str], None],
                     slurm: SlurmSettings = UNSET) -> JobRequest:
    """Validate a kernel's ``job:`` mapping; returns a :class:`~hpc_kernels.model.JobRequest`.

    Precedence: the ``job:`` key, then (account and partition only) the kernel's ``slurm:`` over
    ``defaults: slurm:`` (``slurm``), then the built-in job defaults. Problems go to ``err(line, text)``
    with the line of the key.
    """
    if value is None:
        err(line, f"'job' in {where} is empty: write 'job: {{}}' for the default resources ({JOB_DEFAULT_CPUS} CPU, "
                  f"{JOB_DEFAULT_MEM}, {JOB_DEFAULT_TIME}), or give its keys ({', '.join(JOB_KEYS)}).")
        return JobRequest()
    if not isinstance(value, Mapping):
        err(line, f"'job' in {where} must be a mapping (keys: {', '.join(JOB_KEYS)}; {{}} for the defaults), "
                  f"not {describe_value(value)}.")
        return JobRequest()
    lines: Mapping[str, int] = getattr(value, "lines", {})

    def at(key: str) -> int:
        return lines.get(key, line)

    for key in value:
        if key not in JOB_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), JOB_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected: {', '.join(JOB_KEYS)})"
            err(at(str(key)), f"unknown key '{key}' in the job settings of {where}{hint}.")
    got: dict[str, Any] = {}
    for key in JOB_KEYS:
        if key not in value:
            continue
        raw = value[key]
        if key == "gpus":
            checked = check_gpus(raw)
        elif key == "extra_args" and isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            managed = [a.split("=", 1)[0] for a in raw if a.split("=", 1)[0] in _JOB_MANAGED]
            for flag in managed:
                err(at(key), f"'job: extra_args' in {where} cannot set {flag}: {_JOB_MANAGED[flag]}.")
            if managed:
                continue
            checked = check(key, raw)
        else:
            checked = check(key, raw)
        if checked is None:
            err(at(key), f"'job: {key}' in {where} must be {JOB_EXPECTED[key]}, not {describe_value(raw)}.")
        else:
            got[key] = checked
    return JobRequest(
        time=got.get("time", JOB_DEFAULT_TIME), mem=got.get("mem", JOB_DEFAULT_MEM),
        cpus=got.get("cpus", JOB_DEFAULT_CPUS), gpus=got.get("gpus", ""),
        account=got.get("account", slurm.account), partition=got.get("partition", slurm.partition),
        extra_args=tuple(got.get("extra_args", ())),
    )
