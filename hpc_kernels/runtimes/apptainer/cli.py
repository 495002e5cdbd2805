"""The Apptainer/Singularity command line: binary resolution, the argv of exec and instance commands.

Import-light on purpose: the kernel launcher uses :func:`exec_command` on every kernel start.
:func:`container_command` holds the rules a kernel's container runs under, shared with ``hpc-kernels run``.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.envpolicy import container_env, is_env_name, unexportable
from hpc_kernels.runtimes.gpu import detect

# The launcher imports this module on every kernel start, with ``python -S`` where nothing is preloaded:
# shutil, subprocess, shlex, pathlib and typing cost ~10 ms there, so they are imported where used.
#: Where the connection file appears inside the container. Not under /tmp: Apptainer binds the
#: host's /tmp, and a bind target there would be created on the (shared) host /tmp.
CONNECTION_DST = "/run/hpc-kernels/connection.json"

NOT_FOUND_HINT = (
    "neither 'apptainer' nor 'singularity' was found on PATH; load it first "
    "(on DRAC clusters: 'module load apptainer'), or set HPC_KERNELS_APPTAINER to its path."
)


def find_binary(environ: Mapping[str, str] | None = None, fallback: str = "") -> str:
    """The runtime to use: ``$HPC_KERNELS_APPTAINER``, else ``apptainer``, else ``singularity`` on PATH,
    else ``fallback`` (the runtime recorded at install time) when it still exists."""
    env = os.environ if environ is None else environ
    override = env.get("HPC_KERNELS_APPTAINER")
    if override:
        found = which(override, env.get("PATH"))
        if found:
            return found
        raise RuntimeNotFoundError(f"HPC_KERNELS_APPTAINER={override} is not an executable program.")
    for name in ("apptainer", "singularity"):
        found = which(name, env.get("PATH"))
        if found:
            return found
    if fallback and os.access(fallback, os.X_OK):
        return fallback
    raise RuntimeNotFoundError(NOT_FOUND_HINT)


def which(program: str, search_path: str | None = None) -> str | None:
    """``shutil.which(program, path=search_path)`` without importing shutil (bz2, lzma, fnmatch...)."""
    if os.sep in program:
        candidates = [program]
    else:
        dirs = (os.environ.get("PATH", os.defpath) if search_path is None else search_path).split(os.pathsep)
        candidates = [os.path.join(d, program) for d in dirs if d]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def env_prefix(binary: str) -> str:
    """``APPTAINERENV_`` or ``SINGULARITYENV_``, as the runtime expects."""
    return "SINGULARITYENV_" if os.path.basename(binary).startswith("singularity") else "APPTAINERENV_"


def _passwd_home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # no passwd entry (some containers): nothing to compare with
        return ""


#: The flag that gives a container a vendor's GPUs (see hpc_kernels.runtimes.gpu).
GPU_FLAGS = {"nvidia": ("--nv",), "rocm": ("--rocm",)}


def gpu_flag(gpu: str, exists: object = os.path.exists) -> tuple[str | None, str | None]:
    """The GPU flag for this node (decided at launch) and a warning when the request cannot be met."""
    vendor, warning = detect(gpu, exists)
    return (GPU_FLAGS[vendor][0] if vendor else None), warning


#: Flags on every command that starts a container: ``-q`` keeps Apptainer's INFO lines (``gocryptfs not
#: found``...) out of Jupyter's log (warnings and errors still show).
GLOBAL_FLAGS = ("-q",)

#: ``--no-eval``: Apptainer writes each ``APPTAINERENV_*`` value into a script the container sources, and by
#: default inside *double* quotes, so ``$(...)``, backticks and ``${...}`` in a value run as shell in the
#: container (a notebook named ``$(touch x).ipynb`` reaches us as ``JPY_SESSION_NAME``). With ``--no-eval``
#: (Apptainer >= 1.1, SingularityCE >= 3.10) the values are single-quoted: every byte arrives as it was.
NO_EVAL = "--no-eval"


def container_command(
    spec: LaunchSpec,
    command: Sequence[str],
    binary: str,
    environ: Mapping[str, str],
    extra_binds: Sequence[str] = (),
    exists: object = os.path.exists,
) -> tuple[list[str], dict[str, str], list[str]]:
    """``apptainer exec`` of ``command`` in ``spec``'s image, under the kernel's rules.

    The one place those rules live (the kernel launcher and ``hpc-kernels run`` both come here):
    ``--cleanenv`` plus :func:`container_env`, the GPU flag for this node, ``-W $SLURM_TMPDIR``,
    ``extra_binds`` then the kernel's binds (``$VARS`` expanded now), ``runtime_args``. Returns the
    argv, the *runtime's* own environment (the host's, minus stray ``*ENV_`` injections, plus ours)
    and warnings (e.g. a GPU requested on a node without one).
    """
    flags, warnings = container_flags(spec, environ, extra_binds, exists)
    argv = [binary, *GLOBAL_FLAGS, "exec", "--cleanenv", NO_EVAL, *flags, spec.image, *command]
    return argv, runtime_env(binary, environ, container_env(spec, environ)), warnings


def container_flags(
    spec: LaunchSpec,
    environ: Mapping[str, str],
    extra_binds: Sequence[str] = (),
    exists: object = os.path.exists,
) -> tuple[list[str], list[str]]:
    """The flags every container of ``spec`` gets after ``--cleanenv`` (``exec`` and ``instance start``
    alike), and warnings: the GPU flag for this node, ``-W $SLURM_TMPDIR``, ``extra_binds`` then the kernel's
    binds (``$VARS`` expanded now), then ``runtime_args``."""
    warnings = unexportable(spec, environ)
    flags: list[str] = []
    flag, warning = gpu_flag(spec.gpu, exists)
    if flag:
        flags.append(flag)
    if warning:
        warnings.append(warning)
    tmpdir = environ.get("SLURM_TMPDIR")
    if tmpdir:
        flags += ["-W", tmpdir]
    home = environ.get("HOME")
    if home and home != _passwd_home():
        # Apptainer mounts the passwd home, not $HOME: honour a $HOME set on purpose (a test, a
        # project-local home) so the kernel's ~/.ipython and friends go where the user said.
        flags += ["--home", home]
    for bind in extra_binds:
        flags += ["--bind", bind]
    for bind in spec.binds:
        flags += ["--bind", os.path.expandvars(bind)]
    flags += list(spec.runtime_args)
    return flags, warnings


def exec_command(
    spec: LaunchSpec,
    connection_file: str,
    binary: str,
    environ: Mapping[str, str],
    exists: object = os.path.exists,
) -> tuple[list[str], dict[str, str], list[str]]:
    """The argv and environment of ``apptainer exec`` for the kernel ``spec``, plus warnings for its log.

    :func:`container_command` with the connection file bound at :data:`CONNECTION_DST` and the
    kernel's command, ``{connection_file}`` replaced by that path.
    """
    command = [CONNECTION_DST if a == "{connection_file}" else a for a in spec.command]
    return container_command(spec, command, binary, environ,
                             extra_binds=(f"{connection_file}:{CONNECTION_DST}:rw",), exists=exists)


def run_command(
    spec: LaunchSpec,
    command: Sequence[str],
    binary: str,
    environ: Mapping[str, str],
    exists: object = os.path.exists,
) -> tuple[list[str], dict[str, str], list[str]]:
    """``hpc-kernels run``: ``command`` (default: the kernel command's interpreter, ``command[0]``) in
    the kernel's container under the kernel's rules, without a connection file."""
    return container_command(spec, list(command) or [spec.command[0]], binary, environ, exists=exists)


# ----------------------------------------------------------------------------- instances
# Shared instances (``mode: instance``): the argv and the three calls the instance mode makes
# (runtimes/apptainer/attach.py, records.py, status.py).
# The lifecycle (naming, locking, attachments, idle stop) lives in those modules; this is only the program.


@dataclass(frozen=True)
class ListedInstance:
    """One row of ``apptainer instance list --json``."""

    name: str
    pid: int
    image: str


def runtime_env(binary: str, environ: Mapping[str, str], container: Mapping[str, str]) -> dict[str, str]:
    """The runtime's own environment: the host's minus stray ``*ENV_`` injections, plus ``container``."""
    prefix = env_prefix(binary)
    env = {k: v for k, v in environ.items() if not k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}
    for key, value in container.items():
        if not is_env_name(key):  # the registry refuses such names; a kernel.json edited by hand may not
            raise HpcKernelsError(f"cannot pass the variable {key!r} into the container: not a valid name.")
        env[prefix + key] = value
    return env


def instance_start_command(
    spec: LaunchSpec,
    name: str,
    connection_dir: str,
    pid_file: str,
    binary: str,
    environ: Mapping[str, str],
    exists: object = os.path.exists,
) -> tuple[list[str], dict[str, str], list[str]]:
    """argv, environment and warnings of ``apptainer instance start`` for a shared instance.

    Mounts are fixed when an instance starts (``exec instance://`` cannot add binds), so the
    directory holding the connection files is bound here, at the same path, read-write.
    """
    flags, warnings = container_flags(spec, environ, [f"{connection_dir}:{connection_dir}:rw"], exists)
    argv = [binary, *GLOBAL_FLAGS, "instance", "start", "--cleanenv", NO_EVAL, "--pid-file", pid_file, *flags,
            spec.image, name]
    return argv, runtime_env(binary, environ, container_env(spec, environ)), warnings


def instance_exec_command(
    spec: LaunchSpec,
    name: str,
    connection_file: str,
    binary: str,
    environ: Mapping[str, str],
    markers: Mapping[str, str],
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``apptainer exec instance://NAME`` running the kernel's command.

    The connection file keeps its host path (its directory is bound at the same path);
    ``markers`` are extra container variables that let us find this kernel's processes later.
    """
    argv = [binary, *GLOBAL_FLAGS, "exec", "--cleanenv", NO_EVAL, f"instance://{name}"]
    argv += [connection_file if a == "{connection_file}" else a for a in spec.command]
    container = container_env(spec, environ)
    container.update(markers)
    return argv, runtime_env(binary, environ, container)


def instance_list_command(binary: str, name: str | None = None) -> list[str]:
    """``apptainer instance list --json [NAME]``."""
    return [binary, "instance", "list", "--json"] + ([name] if name else [])


def instance_stop_command(binary: str, name: str, force: bool = False) -> list[str]:
    """``apptainer instance stop [--force] NAME`` (--force sends SIGKILL instead of SIGTERM)."""
    return [binary, "instance", "stop"] + (["--force"] if force else []) + [name]


def parse_instance_list(text: str) -> list[ListedInstance]:
    """Rows of ``instance list --json`` output; anything unexpected is skipped, not fatal."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return []
    rows = data.get("instances") if isinstance(data, dict) else None
    found: list[ListedInstance] = []
    for row in rows or []:
        if isinstance(row, dict) and isinstance(row.get("instance"), str):
            pid = row.get("pid")
            pid = pid if isinstance(pid, int) else 0
            found.append(ListedInstance(row["instance"], pid, str(row.get("img", ""))))
    return found


def start_instance(argv: list[str], env: Mapping[str, str], timeout: float = 120.0) -> None:
    """Run an ``instance start`` argv; ToolError (with Apptainer's message) when it fails."""
    from hpc_kernels.proc import run  # why: subprocess; shared instances only, not the exec-mode launch

    run(argv, env=env, timeout=timeout, message=f"could not start the Apptainer instance '{argv[-1]}'")


def list_instances(binary: str, name: str | None = None, timeout: float = 60.0) -> list[ListedInstance]:
    """This user's instances on this host (Apptainer keeps them per host), optionally one name."""
    from hpc_kernels.proc import run  # why: subprocess; shared instances only, not the exec-mode launch

    result = run(instance_list_command(binary, name), check=False, timeout=timeout)
    return parse_instance_list(result.stdout) if result.returncode == 0 else []


def stop_instance(binary: str, name: str, force: bool = False, timeout: float = 60.0) -> bool:
    """Stop instance ``name``; False when Apptainer refused (e.g. it no longer exists)."""
    from hpc_kernels.proc import run  # why: subprocess; shared instances only, not the exec-mode launch

    return run(instance_stop_command(binary, name, force), check=False, timeout=timeout).returncode == 0
