"""The Apptainer/Singularity adapter: binary resolution, builds through spython, exec argv.

Import-light on purpose: the kernel launcher uses :func:`exec_command` on every kernel start.
:func:`container_command` holds the rules a kernel's container runs under, shared with ``hpc-kernels run``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from hpc_kernels.errors import BuildError, HpcKernelsError, RuntimeNotFoundError
from hpc_kernels.launchspec import LaunchSpec

# The launcher imports this module on every kernel start, with ``python -S`` where nothing is preloaded:
# shutil, subprocess, shlex, pathlib and typing cost ~10 ms there, so they are imported where used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from hpc_kernels.registry import KernelEntry
    from hpc_kernels.runtimes.base import ImageRunner, LineSink

#: Where the connection file appears inside the container. Not under /tmp: Apptainer binds the
#: host's /tmp, and a bind target there would be created on the (shared) host /tmp.
CONNECTION_DST = "/run/hpc-kernels/connection.json"

#: Host variables a kernel sees (besides the kernel's own env/pass_env); the rest is cleaned away
#: so that module environments (PYTHONPATH, LD_LIBRARY_PATH, LD_PRELOAD…) do not leak in.
ENV_ALLOWLIST = (
    "SLURM_*", "SLURMD_NODENAME", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "LANG", "LANGUAGE", "LC_*", "TZ", "USER", "LOGNAME", "JPY_SESSION_NAME",
)

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
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # no passwd entry (some containers): nothing to compare with
        return ""


def gpu_flag(gpu: str, exists: object = os.path.exists) -> tuple[str | None, str | None]:
    """The GPU flag for this node (decided at launch) and a warning when the request cannot be met."""
    check = exists if callable(exists) else os.path.exists
    nvidia = bool(check("/dev/nvidiactl") or check("/dev/nvidia0"))
    amd = bool(check("/dev/kfd"))
    if gpu == "none":
        return None, None
    if gpu == "nvidia":
        return ("--nv", None) if nvidia else (None, "gpu: nvidia requested but this node has no NVIDIA device")
    if gpu == "rocm":
        return ("--rocm", None) if amd else (None, "gpu: rocm requested but this node has no AMD GPU (/dev/kfd)")
    if nvidia:
        return "--nv", None
    if amd:
        return "--rocm", None
    return None, None


#: Flags on every command that starts a container: ``-q`` keeps Apptainer's INFO lines (``gocryptfs not
#: found``...) out of Jupyter's log (warnings and errors still show).
GLOBAL_FLAGS = ("-q",)

#: ``--no-eval``: Apptainer writes each ``APPTAINERENV_*`` value into a script the container sources, and by
#: default inside *double* quotes, so ``$(...)``, backticks and ``${...}`` in a value run as shell in the
#: container (a notebook named ``$(touch x).ipynb`` reaches us as ``JPY_SESSION_NAME``). With ``--no-eval``
#: (Apptainer >= 1.1, SingularityCE >= 3.10) the values are single-quoted: every byte arrives as it was.
NO_EVAL = "--no-eval"


def is_env_name(key: str) -> bool:
    """True for a name a shell can export (``[A-Za-z_][A-Za-z0-9_]*``).

    Apptainer turns each variable into ``export NAME=...`` in a script the container sources; one bad
    name aborts that script and silently drops every variable after it.
    """
    return bool(key) and (key[0].isascii() and (key[0].isalpha() or key[0] == "_")) and all(
        c.isascii() and (c.isalnum() or c == "_") for c in key)


def container_env(spec: LaunchSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the kernel sees inside the container: the allowlist, pass_env, env, and fixes.

    Values are carried byte for byte (the runtime is told not to evaluate them, see :data:`NO_EVAL`);
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


# ----------------------------------------------------------------------------- builds


class Apptainer:
    """Builds images with spython, which we point at the resolved runtime through a shim."""

    name = "apptainer"

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_binary()

    def version(self) -> str:
        """``apptainer --version`` (e.g. ``apptainer version 1.4.5``)."""
        from hpc_kernels.proc import run

        return run([self.binary, "--version"]).stdout.strip()

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """Build ``recipe`` into ``dest`` through spython; every failure becomes a BuildError."""
        from subprocess import CalledProcessError

        try:
            from spython.main import Client
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BuildError(recipe.stem, f"spython is not importable ({exc}); reinstall hpc-kernels.") from None
        lines: list[str] = []

        def sink(line: str) -> None:
            lines.append(line)
            on_line(line)

        with _spython_sees(self.binary), _cwd(recipe.parent):
            try:
                result = Client.build(
                    recipe=str(recipe), image=str(dest), sudo=False, stream=True,
                    options=list(options), quiet=True, force=True,
                )
                if not result:
                    raise BuildError(recipe.stem, "spython did not start a build", "")
                _image, stream = result
                for line in stream:
                    sink(line.rstrip("\n"))
            except CalledProcessError as exc:
                reason = f"apptainer build exited with code {exc.returncode}"
                raise BuildError(recipe.stem, reason, _tail(lines)) from None
            except SystemExit as exc:
                # spython calls sys.exit() from inside the library on some errors.
                raise BuildError(recipe.stem, f"spython gave up (exit {exc.code})", _tail(lines)) from None
            except OSError as exc:
                raise BuildError(recipe.stem, f"could not run the build: {exc}", _tail(lines)) from None
        if not dest.exists():
            raise BuildError(recipe.stem, "the build reported success but wrote no image", _tail(lines))

    def runner(self, entry: KernelEntry, image: str) -> ImageRunner:
        """``apptainer exec`` of the built image under the kernel's rules (no binds): see imagecheck."""
        from hpc_kernels.build import imagecheck

        return imagecheck.probe_spec_runner(entry, image, self.binary)


def _tail(lines: list[str], n: int = 25) -> str:
    kept = [ln for ln in lines if ln.strip()]
    return "\n".join(kept[-n:])


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    # %files sources are relative paths; run the build beside the recipe so they resolve there.
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _spython_sees(binary: str) -> Iterator[None]:
    """Put a private ``singularity`` shim first on PATH for this process only, during the build.

    The shim runs the runtime under :mod:`hpc_kernels.build.guard`, which ties the build's processes to
    this one (they die with it, whichever way it dies).
    """
    import shlex

    from hpc_kernels import paths, templates
    from hpc_kernels.build import guard as buildguard
    from hpc_kernels.fsutil import atomic_write

    shim_dir = paths.cache_dir() / "spython-bin"
    shim = shim_dir / "singularity"
    guard = shlex.join(buildguard.argv())
    text = templates.render("singularity-shim.sh.tmpl", guard=guard, runtime=shlex.quote(binary))
    if not shim.exists() or shim.read_text() != text:
        atomic_write(shim, text, mode=0o755)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


# ----------------------------------------------------------------------------- instances
# Shared instances (``mode: instance``): the argv and the three calls hpc_kernels.instances makes.
# The lifecycle (naming, locking, attachments, idle stop) lives there; this is only the program.


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
    import json

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
    from hpc_kernels.proc import run

    run(argv, env=env, timeout=timeout, message=f"could not start the Apptainer instance '{argv[-1]}'")


def list_instances(binary: str, name: str | None = None, timeout: float = 60.0) -> list[ListedInstance]:
    """This user's instances on this host (Apptainer keeps them per host), optionally one name."""
    from hpc_kernels.proc import run

    result = run(instance_list_command(binary, name), check=False, timeout=timeout)
    return parse_instance_list(result.stdout) if result.returncode == 0 else []


def stop_instance(binary: str, name: str, force: bool = False, timeout: float = 60.0) -> bool:
    """Stop instance ``name``; False when Apptainer refused (e.g. it no longer exists)."""
    from hpc_kernels.proc import run

    return run(instance_stop_command(binary, name, force), check=False, timeout=timeout).returncode == 0
