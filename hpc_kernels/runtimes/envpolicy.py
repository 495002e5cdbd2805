"""The environment a kernel sees inside its container: an allowlist of host variables, the kernel's own
``pass_env``/``env``, and fixes. No runtime owns it: Apptainer passes the result as ``APPTAINERENV_*``,
Docker/Podman as ``-e NAME``. Import-light: the launcher runs it on every kernel start."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

TYPE_CHECKING = False  # why: typing is not loaded on the launcher's path (python -S)
if TYPE_CHECKING:
    from hpc_kernels.model import LaunchSpec

#: Host variables a kernel sees (besides the kernel's own env/pass_env); the rest is cleaned away
#: so that module environments (PYTHONPATH, LD_LIBRARY_PATH, LD_PRELOAD…) do not leak in.
ENV_ALLOWLIST = (
    "SLURM_*", "SLURMD_NODENAME", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "LANG", "LANGUAGE", "LC_*", "TZ", "USER", "LOGNAME", "JPY_SESSION_NAME",
)


def is_env_name(key: str) -> bool:
    """True for a name a shell can export (``[A-Za-z_][A-Za-z0-9_]*``).

    Apptainer turns each variable into ``export NAME=...`` in a script the container sources; one bad
    name aborts that script and silently drops every variable after it.
    """
    return bool(key) and (key[0].isascii() and (key[0].isalpha() or key[0] == "_")) and all(
        c.isascii() and (c.isalnum() or c == "_") for c in key)


def container_env(spec: LaunchSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the kernel sees inside the container: the allowlist, pass_env, env, and fixes.

    Values are carried byte for byte (the runtime is told not to evaluate them, see ``runtimes.apptainer.cli.NO_EVAL``);
    host variables whose *names* a shell cannot export are left out (:func:`unexportable`).
    """
    wanted = ENV_ALLOWLIST + spec.pass_env
    result: dict[str, str] = {}
    for key, value in environ.items():
        if is_env_name(key) and any(fnmatch.fnmatchcase(key, pat) for pat in wanted):
            result[key] = value
    result.update(spec.env)
    # $HOME is bound: without this, ~/.local site-packages of the host Python leak into the kernel.
    result["PYTHONNOUSERSITE"] = "1"
    return result


def unexportable(spec: LaunchSpec, environ: Mapping[str, str]) -> list[str]:
    """Warnings for host variables the kernel asked for whose names cannot be exported (left out)."""
    wanted = ENV_ALLOWLIST + spec.pass_env
    bad = sorted(k for k in environ if not is_env_name(k) and any(fnmatch.fnmatchcase(k, p) for p in wanted))
    return [f"left out the host variable {k!r}: it is not a valid environment variable name" for k in bad]
