"""What a kernel's launcher needs to know, stored as data in kernel.json's metadata.

Kept free of heavy imports: the launcher reads this on every kernel start (``re`` and ``json`` are
imported by the launcher anyway). A kernel.json is a file anyone can edit: :meth:`LaunchSpec.from_json`
checks every field as strictly as the registry does, so a damaged one is one sentence naming the field
and the fix, never a traceback in the launcher, the reaper, ``doctor`` or ``gc``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: kernel.json ``metadata`` key that marks a kernelspec as ours.
MARKER = "hpc_kernels"
FORMAT = 1

#: The values the registry accepts (registry.py uses these very tuples and patterns).
MODES = ("exec", "instance")
RUNTIMES = ("apptainer", "docker", "podman")
GPU_CHOICES = ("auto", "nvidia", "rocm", "none")
#: Jupyter's own rule for kernel names (jupyter_client.kernelspec._kernel_name_pat).
KERNEL_NAME_RE = re.compile(r"^[a-z0-9._-]+$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PASS_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")


class KernelSpecError(ValueError):
    """A kernel.json of ours that cannot be used: ``str(err)`` is one sentence with the fix."""


#: Keys of a kernel's ``job:`` (registry) and of the launch spec's ``job`` object.
JOB_KEYS = ("gpus", "time", "mem", "cpus", "account", "partition", "extra_args")
#: What a Slurm option value may not hold (it is written on an ``#SBATCH`` line): white space, quotes,
#: backslashes, '#', control characters. The registry checks more strictly (slurm_settings.check).
_SBATCH_UNSAFE = re.compile(r"[\s\"'\\#\x00-\x1f\x7f-\x9f]")
#: ``gpus``: a count, or ``type:count`` (``h100:1``) as ``--gpus-per-node`` takes it.
GPUS_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+:)?[0-9]+$")


@dataclass(frozen=True)
class JobRequest:
    """The Slurm allocation a job kernel runs in (``job:`` in the registry); values already validated."""

    time: str = "1:00:00"
    mem: str = "4G"
    cpus: int = 1
    gpus: str = ""
    account: str | None = None
    partition: str | None = None
    extra_args: tuple[str, ...] = ()

    def summary(self) -> str:
        """The resources as a display name shows them: ``1 GPU, 32G, 2:00:00``."""
        parts = []
        if self.gpus and self.gpus.rsplit(":", 1)[-1] != "0":
            kind, _, count = self.gpus.rpartition(":")
            parts.append(f"{count} {kind + ' ' if kind else ''}GPU{'s' if count != '1' else ''}")
        if self.cpus != 1:
            parts.append(f"{self.cpus} CPUs")
        parts += [self.mem, human_time(self.time)]
        return ", ".join(parts)


_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def human_time(value: str) -> str:
    """A Slurm time limit as a menu shows it: ``2:00:00`` -> ``2 h``, ``90`` -> ``1 h 30 min``, ``1-0`` -> ``1 d``."""
    match = _SLURM_TIME_RE.match(value.strip())
    if not match:
        return value
    days, first, second, third = match.groups()
    if days is not None:
        minutes = int(days) * 1440 + int(first) * 60 + int(second or 0)
    elif third is not None:
        minutes = int(first) * 60 + int(second)
    else:
        minutes = int(first)  # minutes, or minutes:seconds
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    text = " ".join(f"{n} {unit}" for n, unit in ((d, "d"), (h, "h"), (m, "min")) if n)
    return text or value


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the launcher decides from; resolved against the node only at launch."""

    kernel: str
    runtime: str
    mode: str
    image: str
    command: tuple[str, ...]
    binds: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = ()
    gpu: str = "auto"
    runtime_args: tuple[str, ...] = ()
    idle_timeout: float = 300.0
    container_image: str | None = None
    image_id: str = ""
    registry: str = ""
    #: The runtime found when the kernelspec was installed: used when the server's PATH has none
    #: (a JupyterHub session where `module load apptainer` was not done).
    runtime_hint: str = ""
    #: Set for a job kernel: the kernel runs in a Slurm allocation of its own (hpc_kernels.runtimes.job).
    job: JobRequest | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists)."""
        data = asdict(self)
        data["env"] = dict(self.env)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: Any, name: str = "") -> LaunchSpec:
        """Inverse of :meth:`to_json`; raises :class:`KernelSpecError` (a ``ValueError``) naming the first
        field that is missing or wrong, and the fix. ``name`` names the kernel when ``kernel`` itself is bad."""
        if isinstance(data, dict) and isinstance(data.get("kernel"), str) and _is_name(data["kernel"]):
            name = data["kernel"]
        fix = f"reinstall with 'hpc-kernels install {name or 'NAME'}'"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KernelSpecError(f"its '{MARKER}' metadata is not a launch spec of this version of "
                                  f"hpc-kernels; {fix}.")
        fields: dict[str, Any] = {}
        for key, (required, check, expected) in _CHECKS.items():
            if key not in data:
                if required:
                    raise KernelSpecError(f"it has no '{key}' ({expected}); {fix}.")
                continue
            value = data[key]
            if not check(value):
                raise KernelSpecError(f"'{key}' must be {expected}, not {_describe(value)}; {fix}.")
            fields[key] = value
        for key in ("command", "binds", "pass_env", "runtime_args"):
            fields[key] = tuple(fields.get(key, ()))
        fields["env"] = tuple(sorted(fields.get("env", {}).items()))
        if "idle_timeout" in fields:
            fields["idle_timeout"] = float(fields["idle_timeout"])
        job = fields.get("job")
        if job is not None:
            fields["job"] = JobRequest(**{**job, "extra_args": tuple(job.get("extra_args", ()))})
        return cls(**fields)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(KERNEL_NAME_RE.match(v))


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _nonempty(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)  # tuples: to_json()'s own


def _command(v: Any) -> bool:
    return _str_list(v) and bool(v) and "{connection_file}" in v


def _binds(v: Any) -> bool:
    return _str_list(v) and all(b and b.count(":") <= 2 for b in v)


def _env(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(x, str)
                                       for k, x in v.items())


def _pass_env(v: Any) -> bool:
    return _str_list(v) and all(PASS_ENV_RE.match(x) for x in v)


def _job_value(key: str, v: Any) -> bool:
    if key == "cpus":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if key == "extra_args":
        return _str_list(v) and all(a.startswith("-") and not _SBATCH_UNSAFE.search(a) for a in v)
    if key in ("account", "partition") and v is None:
        return True
    if key == "gpus":
        return isinstance(v, str) and (v == "" or bool(GPUS_RE.match(v)))
    return isinstance(v, str) and bool(v) and not _SBATCH_UNSAFE.search(v)


def _job(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and set(v) <= set(JOB_KEYS)
                         and all(_job_value(k, x) for k, x in v.items()))


def _seconds(v: Any) -> bool:
    # NaN fails ``v >= 0``; inf is allowed, as in the registry (never stop).
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


#: Each field: (required, check, what it must be), in the order they are reported.
_CHECKS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "kernel": (True, _is_name, "a kernel name (lowercase letters, digits, '.', '_', '-')"),
    "runtime": (True, lambda v: v in RUNTIMES, f"one of {', '.join(RUNTIMES)}"),
    "mode": (True, lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "image": (True, _nonempty, "the path of the kernel's image"),
    "command": (True, _command, "a list of strings with the argument '{connection_file}'"),
    "binds": (False, _binds, "a list of bind specs (src[:dst[:opts]])"),
    "env": (False, _env, "an object of variable name to string"),
    "pass_env": (False, _pass_env, "a list of variable names (NAME or PREFIX*)"),
    "gpu": (False, lambda v: v in GPU_CHOICES, f"one of {', '.join(GPU_CHOICES)}"),
    "runtime_args": (False, _str_list, "a list of strings"),
    "idle_timeout": (False, _seconds, "a number of seconds (>= 0)"),
    "container_image": (False, lambda v: v is None or _nonempty(v), "a container image name or null"),
    "image_id": (False, _is_str, "a string"),
    "registry": (False, _is_str, "a string"),
    "runtime_hint": (False, _is_str, "a string"),
    "job": (False, _job, f"null or an object with the keys {', '.join(JOB_KEYS)} holding Slurm values"),
}


def _describe(value: Any) -> str:
    """A JSON value as a user sees it in kernel.json."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_kernel_json(path: str) -> tuple[dict[str, Any], LaunchSpec]:
    """Load a kernel.json we wrote and its launch spec.

    Raises ``OSError`` when the file cannot be read and :class:`KernelSpecError` (one sentence: the file,
    the field, ``hpc-kernels install NAME``) when it is not what we write.
    """
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError: a file that is not text
        raise KernelSpecError(f"the kernelspec {path} is damaged: not valid JSON ({exc}); reinstall with "
                              f"'hpc-kernels install {name}'.") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or MARKER not in meta:
        raise KernelSpecError(f"the kernelspec {path} was not written by hpc-kernels (no metadata."
                              f"{MARKER}); reinstall with 'hpc-kernels install {name}'.")
    try:
        spec = LaunchSpec.from_json(meta[MARKER], name)
    except KernelSpecError as exc:
        raise KernelSpecError(f"the kernelspec {path} is damaged: {exc}") from None
    return data, spec
