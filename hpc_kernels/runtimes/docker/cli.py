"""The Docker/Podman adapter: one class for both CLIs (they speak the same language).

It owns the exact argv of ``build``/``run``/``exec``/``rm -f``/``ps --filter label=…``/``inspect``,
recipe conversion (Apptainer ``.def`` → Dockerfile through spython), and incremental builds whose
input digest is recorded as an image label. Import-light: the kernel launcher uses it on every start.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError
from hpc_kernels.model import LOCAL_IMAGE_PREFIX, LaunchSpec, default_container_image
from hpc_kernels.proc import run
from hpc_kernels.runtimes import table
from hpc_kernels.runtimes.base import Features, ImageRunner, LineSink
from hpc_kernels.runtimes.envpolicy import container_env
from hpc_kernels.runtimes.gpu import detect

if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry

CONTAINER_RUNTIMES = ("docker", "podman")

#: Where a per-kernel container sees its connection file (bound read-write: ipykernel rewrites it).
CONNECTION_DST = "/run/hpc-kernels/connection.json"
#: Where a shared container sees the directory of its kernels' connection files.
SHARED_CONN_DIR = "/run/hpc-kernels/conn"

LABEL_KERNEL = "hpc-kernels.kernel"  # every container and image we make carries it
LABEL_ROLE = "hpc-kernels.role"  # kernel (one container per kernel) | shared
LABEL_HOST = "hpc-kernels.host"
LABEL_OWNER = "hpc-kernels.owner"
LABEL_PID = "hpc-kernels.pid"  # the launcher (per-kernel containers)
LABEL_PID_START = "hpc-kernels.pid-start"  # its start time, so a reused pid is not mistaken for it
LABEL_CONNECTION = "hpc-kernels.connection"
LABEL_IDLE = "hpc-kernels.idle-timeout"
LABEL_DIGEST = "hpc-kernels.digest"  # images: digest of the build inputs
LABEL_BUILT_AT = "hpc-kernels.built-at"

#: stderr of a CLI that has no daemon/service to talk to (as opposed to "no such image").
UNREACHABLE = ("cannot connect", "connection refused", "permission denied", "is the docker daemon running")
#: Image tags we build ourselves (registry.py gives built kernels this default name).
LOCAL_PREFIX = LOCAL_IMAGE_PREFIX
DESKTOP_HINT = (
    "this container runtime runs containers in a virtual machine (Docker Desktop, or Podman on "
    "macOS/Windows) where --network=host does not reach this computer, so Jupyter could not connect "
    "to the kernel; use Docker Engine or Podman on Linux, or an Apptainer kernel."
)


def find_binary(runtime: str, environ: Mapping[str, str] | None = None) -> str:
    """``$HPC_KERNELS_DOCKER``/``$HPC_KERNELS_PODMAN`` if set, else ``docker``/``podman`` on PATH."""
    if runtime not in CONTAINER_RUNTIMES:
        raise HpcKernelsError(f"'{runtime}' is not a Docker-compatible runtime.")
    env = os.environ if environ is None else environ
    var = f"HPC_KERNELS_{runtime.upper()}"
    wanted = env.get(var) or runtime
    found = shutil.which(wanted, path=env.get("PATH"))
    if found:
        return found
    if env.get(var):
        raise RuntimeNotFoundError(f"{var}={wanted} is not an executable program.")
    raise RuntimeNotFoundError(
        f"'{runtime}' was not found on PATH; install it, or set {var} to its path "
        f"(kernels with 'runtime: {runtime}' need it)."
    )


def user_name() -> str:
    """The login name, safe for a container name."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name) or "user"


def docker_binds(binds: Sequence[str]) -> list[str]:
    """Registry binds (Apptainer's ``src[:dst[:opts]]``) as ``-v`` arguments (docker needs ``dst``)."""
    args: list[str] = []
    for bind in binds:
        parts = os.path.expanduser(os.path.expandvars(bind)).split(":")
        src = os.path.abspath(parts[0])
        dst = parts[1] if len(parts) > 1 and parts[1] else src
        opts = f":{parts[2]}" if len(parts) > 2 and parts[2] else ""
        args += ["-v", f"{src}:{dst}{opts}"]
    return args


def label_args(labels: Mapping[str, str]) -> list[str]:
    """``--label k=v`` for each label, in a stable order."""
    args: list[str] = []
    for key in sorted(labels):
        args += ["--label", f"{key}={labels[key]}"]
    return args


def env_args(environ: Mapping[str, str]) -> list[str]:
    """``-e NAME`` for each variable: values travel in the CLI's environment, not in ``ps`` output."""
    args: list[str] = []
    for key in sorted(environ):
        args += ["-e", key]
    return args


@dataclass(frozen=True)
class ContainerInfo:
    """What ``inspect`` says about one of our containers."""

    id: str
    name: str
    running: bool
    labels: dict[str, str]
    image: str


class ContainerCLI:
    """The ``docker`` or ``podman`` command line: argv builders (pure) and the calls that run them."""

    def __init__(self, runtime: str, binary: str | None = None) -> None:
        self.name = runtime
        self.binary = binary or find_binary(runtime)
        self.features: Features = table.get(runtime).features

    # ------------------------------------------------------------------ argv (pure)

    def gpu_args(self, gpu: str, exists: object = os.path.exists) -> tuple[list[str], list[str]]:
        """GPU flags for this node (decided at launch) and warnings."""
        vendor, warning = detect(gpu, exists)
        warnings = [warning] if warning else []
        return list(self.features.gpu_flags.get(vendor or "", ())), warnings

    def run_argv(
        self, spec: LaunchSpec, connection_file: str, name: str, labels: Mapping[str, str],
        container_env: Mapping[str, str], exists: object = os.path.exists,
    ) -> tuple[list[str], list[str]]:
        """``run`` of one kernel in its own container, and warnings.

        ``--init``: an init as PID 1 forwards signals (Python as PID 1 ignores SIGTERM);
        ``--rm``: the container goes when the kernel exits; signals to the client are proxied
        to the kernel (``--sig-proxy`` is on for attached runs), so SIGINT interrupts it.
        """
        if ":" in connection_file or "," in connection_file:
            raise HpcKernelsError(
                f"the connection file path {connection_file!r} contains ':' or ',', which "
                f"'{self.name} run -v' cannot bind; set JUPYTER_RUNTIME_DIR to a plain path.")
        gpu, warnings = self.gpu_args(spec.gpu, exists)
        argv = [self.binary, "run", "--rm", "--init", "--network=host", "--name", name]
        argv += label_args(labels)
        argv += ["-v", f"{connection_file}:{CONNECTION_DST}:rw"]
        argv += docker_binds(spec.binds) + gpu + env_args(container_env) + list(spec.runtime_args)
        argv.append(image_name(spec))
        argv += [CONNECTION_DST if a == "{connection_file}" else a for a in spec.command]
        return argv, warnings

    def shared_run_argv(
        self, spec: LaunchSpec, name: str, labels: Mapping[str, str], conn_dir: str,
        exists: object = os.path.exists,
    ) -> tuple[list[str], list[str]]:
        """``run -d`` of a shared container that idles (``sleep infinity``) until kernels ``exec`` into it."""
        gpu, warnings = self.gpu_args(spec.gpu, exists)
        argv = [self.binary, "run", "-d", "--init", "--network=host", "--name", name]
        argv += label_args(labels)
        argv += ["-v", f"{conn_dir}:{SHARED_CONN_DIR}:rw"]
        argv += docker_binds(spec.binds) + gpu + list(spec.runtime_args)
        argv += [image_name(spec), "sleep", "infinity"]
        return argv, warnings

    def exec_argv(self, spec: LaunchSpec, name: str, connection_path: str,
                  container_env: Mapping[str, str]) -> list[str]:
        """``exec`` of one kernel in the shared container ``name`` (signals are not forwarded)."""
        argv = [self.binary, "exec", *env_args(container_env), name]
        return argv + [connection_path if a == "{connection_file}" else a for a in spec.command]

    def rm_argv(self, name: str) -> list[str]:
        """``rm -f``: kill and remove. Podman would first wait 10 s for a SIGTERM to work: ``-t 0``."""
        return [self.binary, "rm", "-f", *self.features.rm_flags, name]

    def ps_argv(self, *filters: str) -> list[str]:
        """IDs of all containers (running or not) matching every ``--filter``."""
        argv = [self.binary, "ps", "-a", "-q", "--no-trunc"]
        for f in filters:
            argv += ["--filter", f]
        return argv

    def build_argv(self, dockerfile: Path, context: Path, options: Sequence[str]) -> list[str]:
        """``build`` of a converted recipe (``options`` carry ``-t TAG`` and ``--label``s); host network,
        as Apptainer builds have."""
        return [self.binary, "build", "--network=host", *options, "-f", str(dockerfile), str(context)]

    # ------------------------------------------------------------------ calls

    def version(self) -> str:
        """``docker --version`` / ``podman --version``."""
        return run([self.binary, "--version"], timeout=30).stdout.strip()

    def check_host_network(self) -> None:
        """Fail with one sentence where ``--network=host`` cannot work (Docker Desktop, non-Linux)."""
        if sys.platform != "linux":
            raise HpcKernelsError(DESKTOP_HINT)
        if self.features.desktop_check:
            info = run([self.binary, "info", "--format", "{{.OperatingSystem}}"], check=False, timeout=30)
            if "docker desktop" in info.stdout.lower():
                raise HpcKernelsError(DESKTOP_HINT)

    def remove(self, *names: str, timeout: float = 60) -> None:
        """``rm -f`` containers; a container that is already gone is not an error."""
        # One call per name: podman 4.3 silently stops at the first name that no longer exists.
        for name in names:
            run(self.rm_argv(name), check=False, timeout=timeout)

    def ids(self, *filters: str) -> list[str]:
        """IDs of containers matching the filters."""
        out = run(self.ps_argv(*filters), timeout=60).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def inspect(self, ids: Sequence[str]) -> list[ContainerInfo]:
        """``inspect`` of containers (ones that vanished meanwhile are skipped)."""
        if not ids:
            return []
        res = run([self.binary, "inspect", "--type", "container", *ids], check=False, timeout=60)
        try:
            data = json.loads(res.stdout or "[]")
        except ValueError:
            return []
        found = []
        for item in data if isinstance(data, list) else []:
            config = item.get("Config") or {}
            found.append(ContainerInfo(
                id=str(item.get("Id", "")), name=str(item.get("Name", "")).lstrip("/"),
                running=bool((item.get("State") or {}).get("Running")),
                labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
                image=str(item.get("Image", "")),
            ))
        return found

    def ours(self, *filters: str) -> list[ContainerInfo]:
        """Our containers (label ``hpc-kernels.kernel``) matching more filters."""
        return self.inspect(self.ids(f"label={LABEL_KERNEL}", *filters))

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The labels of a local image, or None when it does not exist here."""
        argv = [self.binary, "image", "inspect", "--format", "{{json .Config.Labels}}", image]
        res = run(argv, check=False, timeout=60)
        if res.returncode != 0:
            if any(s in res.stderr.lower() for s in UNREACHABLE):
                raise ToolError(argv, res.returncode, res.stderr, f"{self.name} is not reachable")
            return None
        try:
            data = json.loads(res.stdout.strip() or "null")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in (data or {}).items()}

    def image_id(self, image: str) -> str | None:
        """The ID of a local image, or None."""
        res = run([self.binary, "image", "inspect", "--format", "{{.Id}}", image], check=False, timeout=60)
        return res.stdout.strip() or None if res.returncode == 0 else None

    def remove_dangling(self, image_id: str) -> None:
        """Remove an image that no tag names any more (a superseded build); keep it if a container uses it."""
        tags = run([self.binary, "image", "inspect", "--format", "{{json .RepoTags}}", image_id],
                   check=False, timeout=60)
        if tags.returncode == 0 and tags.stdout.strip() in ("[]", "null"):
            run([self.binary, "rmi", image_id], check=False, timeout=120)

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
        """The :class:`~hpc_kernels.runtimes.base.Builder` shape: convert ``recipe`` to a Dockerfile
        written at ``dest`` and run ``build OPTIONS -f dest CONTEXT`` (options carry ``-t``/``--label``)."""
        from hpc_kernels.runtimes.docker.dockerfile import atomic_dockerfile, stream  # why: builds only

        atomic_dockerfile(recipe, dest)
        stream(self.build_argv(dest, recipe.parent, options), recipe.stem, on_line)

    def runner(self, entry: KernelEntry, image: str) -> ImageRunner:
        """``run --rm`` of ``image`` (name or ID) with the kernel's environment, no network, no binds."""
        def run_in(argv: Sequence[str]) -> tuple[int, str]:
            spec = LaunchSpec(entry.name, entry.runtime, entry.mode, image, entry.command, env=entry.env,
                              pass_env=entry.pass_env)
            command = [self.binary, "run", "--rm", "--network=none", *label_args({LABEL_KERNEL: entry.name}),
                       *env_args(container_env(spec, os.environ)), image, *argv]
            try:
                result = run(command, check=False, timeout=180)
            except ToolError as exc:
                return -1, str(exc)
            return result.returncode, result.stderr + result.stdout

        return run_in


def image_name(spec: LaunchSpec) -> str:
    """The container image a launch spec runs."""
    return spec.container_image or default_container_image(spec.kernel)
