"""Checks of the node: the runtime and its version, user namespaces for builds, the login node, the
environment, the state directories."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths, proc
from hpc_kernels.doctor.base import (
    FAIL,
    LEAKY_VARS,
    LOGIN_RE,
    MIN_APPTAINER,
    MIN_SINGULARITY,
    OK,
    WARN,
    Context,
    Finding,
    _short,
)
from hpc_kernels.errors import RuntimeNotFoundError, ToolError
from hpc_kernels.model import KernelEntry, Runtime

# ----------------------------------------------------------------------------- host checks


def check_runtime(ctx: Context, runtime: str = "apptainer",
                  fallbacks: Mapping[str, str] | None = None) -> tuple[Finding, str | None]:
    """Which container program the kernels will use; returns the finding and the binary (None when none).

    For Apptainer this follows the launcher: ``$HPC_KERNELS_APPTAINER``, ``apptainer`` or ``singularity`` on
    PATH, else the one each kernelspec recorded when it was installed (``fallbacks``: installed kernel name
    to that path), so a JupyterHub session without ``module load apptainer`` is reported as it is.
    """
    if runtime == Runtime.APPTAINER:
        try:
            binary = apptainer.find_binary(ctx.environ)
        except RuntimeNotFoundError as exc:
            return _runtime_fallback(ctx, str(exc), fallbacks or {})
        return Finding("runtime", OK, f"Apptainer found: {binary}"), binary
    found = shutil.which(runtime, path=ctx.environ.get("PATH"))
    if not found:
        return Finding("runtime", FAIL, f"'{runtime}' is not on PATH (a kernel of the registry uses it).",
                       f"install {runtime} (Docker/Podman are for laptops and workstations; HPC clusters "
                       "offer Apptainer: set 'runtime: apptainer' there)."), None
    return Finding("runtime", OK, f"{runtime} found: {found}"), found


def _runtime_fallback(ctx: Context, problem: str, fallbacks: Mapping[str, str]) -> tuple[Finding, str | None]:
    """No Apptainer on PATH: what each installed kernel's launcher falls back to (the install-time one)."""
    fix = ("on DRAC clusters run 'module load apptainer' (it is not in StdEnv) before starting Jupyter, or set "
           "HPC_KERNELS_APPTAINER to the program's path.")
    if ctx.environ.get("HPC_KERNELS_APPTAINER"):  # a bad override stops the launcher too: no fallback
        return Finding("runtime", FAIL, f"no Apptainer: {problem}", fix), None
    usable: dict[str, str] = {}
    for name, hint in sorted(fallbacks.items()):
        with contextlib.suppress(RuntimeNotFoundError):
            usable[name] = apptainer.find_binary(ctx.environ, fallback=hint)
    stranded = sorted(set(fallbacks) - set(usable))
    if not usable:
        none = (f"; the installed kernels ({', '.join(stranded)}) recorded none that still exists" if stranded
                else "")
        return Finding("runtime", FAIL, f"no Apptainer: {problem}{none}", fix), None
    binaries = sorted(set(usable.values()))
    uses = "; ".join(f"{b} ({', '.join(n for n, u in usable.items() if u == b)})" for b in binaries)
    message = (f"no Apptainer on PATH, but the installed kernels start with the one recorded when they were "
               f"installed (the launcher's fallback): {uses}")
    builds = "'hpc-kernels build' needs it on PATH: 'module load apptainer' first."
    if stranded:
        return Finding("runtime", WARN, f"{message}; {', '.join(stranded)} recorded none that exists and will "
                       "not start.", fix + " Or reinstall those kernels where Apptainer is on PATH."), binaries[0]
    return Finding("runtime", OK, f"{message}. {builds}"), binaries[0]


def parse_version(text: str) -> tuple[str, tuple[int, ...]] | None:
    """``apptainer version 1.4.5-2`` → (``apptainer``, (1, 4, 5)); ``singularity-ce version 4.1.0`` too."""
    match = re.search(r"(apptainer|singularity(?:-ce)?)\s+version\s+(\d+)\.(\d+)(?:\.(\d+))?", text, re.I)
    if not match:
        return None
    numbers = tuple(int(g) for g in match.groups()[1:] if g is not None)
    return match.group(1).lower(), numbers


def check_runtime_version(binary: str, ctx: Context) -> Finding:
    """Is this Apptainer (or Singularity) recent enough for our launcher and for unprivileged builds?"""
    try:
        out = proc.run([binary, "--version"], env=ctx.environ, timeout=ctx.probe_timeout)
    except (ToolError, RuntimeNotFoundError) as exc:
        return Finding("runtime-version", FAIL, f"'{binary} --version' failed: {exc}",
                       "reinstall or reload the runtime ('module load apptainer').")
    text = (out.stdout or out.stderr).strip()
    parsed = parse_version(text)
    if parsed is None:
        return Finding("runtime-version", WARN, f"could not read a version from '{text}'.",
                       "check that HPC_KERNELS_APPTAINER / PATH point at Apptainer.")
    name, version = parsed
    shown = ".".join(map(str, version))
    if name == Runtime.APPTAINER:
        if version[:2] < MIN_APPTAINER:
            need = ".".join(map(str, MIN_APPTAINER))
            return Finding("runtime-version", FAIL,
                           f"Apptainer {shown} is too old: hpc-kernels needs {need} or newer "
                           "(unprivileged --fakeroot builds, instance flags).",
                           "load a newer module ('module spider apptainer', then 'module load "
                           "apptainer/<newest>') or ask your site to upgrade.")
        return Finding("runtime-version", OK, f"Apptainer {shown}.")
    if version[:2] < MIN_SINGULARITY:
        need = ".".join(map(str, MIN_SINGULARITY))
        return Finding("runtime-version", FAIL, f"{name} {shown} is too old (needs {need} or newer).",
                       "load Apptainer instead ('module load apptainer').")
    return Finding("runtime-version", WARN,
                   f"{name} {shown}: kernels run, but Apptainer >= 1.1 is recommended "
                   "(builds without root use its --fakeroot).",
                   "prefer 'module load apptainer' where the site offers it.")


def check_build_namespaces(ctx: Context, entries: Iterable[KernelEntry]) -> Finding | None:
    """Can this user build here? Unprivileged builds need user namespaces (and subuids for --fakeroot)."""
    buildable = [e for e in entries if e.buildable and e.runtime == Runtime.APPTAINER]
    if not buildable:
        return None
    if ctx.uid == 0:
        return Finding("build-namespaces", OK, "running as root: builds need no user namespace.")
    for knob in ("sys/user/max_user_namespaces", "sys/kernel/unprivileged_userns_clone"):
        value = _read_int(ctx.proc_root / knob)
        if value == 0:
            return Finding("build-namespaces", FAIL,
                           f"user namespaces are disabled on {ctx.hostname} ({ctx.proc_root / knob} = 0): "
                           "Apptainer cannot build images here without root.",
                           "build where they are enabled, e.g. inside a Slurm job "
                           "('hpc-kernels build NAME --slurm'), or ask your site's support.")
    fakeroot = [e.name for e in buildable if e.fakeroot]
    if fakeroot and not _has_subid(ctx, "subuid"):
        return Finding("build-namespaces", WARN,
                       f"{ctx.etc_root / 'subuid'} has no range for {ctx.user}: --fakeroot builds of "
                       f"{', '.join(fakeroot)} fall back to a root-mapped namespace, where package managers "
                       "that change file owners (apt, dnf) can fail.",
                       "ask support for a subuid/subgid range, or install with pip/conda in %post, or "
                       "start from an image that already has what you need.")
    return Finding("build-namespaces", OK, "user namespaces are enabled: unprivileged builds can run.")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii", errors="replace").strip())
    except (OSError, ValueError):
        return None


def _has_subid(ctx: Context, name: str) -> bool:
    try:
        lines = (ctx.etc_root / name).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    keys = {ctx.user, str(ctx.uid)}
    return any(line.split(":", 1)[0] in keys for line in lines if ":" in line)


def check_login_node(ctx: Context) -> Finding:
    """Kernels and builds belong in a job, not on a shared login node (a hostname heuristic)."""
    job = ctx.environ.get("SLURM_JOB_ID")
    if job:
        return Finding("login-node", OK, f"inside Slurm job {job} on {ctx.hostname}.")
    if LOGIN_RE.match(ctx.hostname):
        return Finding("login-node", WARN,
                       f"{ctx.hostname} looks like a login node (no SLURM_JOB_ID): kernels started here "
                       "share the login node with everyone, and DRAC asks not to run Apptainer there.",
                       "use JupyterHub / Open OnDemand (their sessions are Slurm jobs), or 'salloc' first; "
                       "build images with 'hpc-kernels build NAME --slurm'.")
    return Finding("login-node", OK, f"{ctx.hostname} is not a login node by name (no Slurm job either).")


def check_environment(ctx: Context) -> list[Finding]:
    """Module environments that leak into the launcher's Python or the runtime (and ~/.local packages)."""
    findings: list[Finding] = []
    for var in LEAKY_VARS:
        value = ctx.environ.get(var)
        if value:
            findings.append(Finding(
                "environment", WARN,
                f"{var} is set ({_short(value)}): hpc-kernels does not pass it into containers, but the "
                "launcher's host Python, the runtime and any non-container kernel see it.",
                f"unset {var} (or 'module unload' what sets it) before starting Jupyter; pass it to one "
                "kernel on purpose with 'pass_env' or 'env' in the registry."))
    user_sites = sorted((ctx.home / ".local" / "lib").glob("python3*/site-packages"))
    populated = [s for s in user_sites if any(s.iterdir())]
    if populated:
        findings.append(Finding(
            "environment", WARN,
            f"{', '.join(str(s) for s in populated)} holds packages: any Python that sees your home imports "
            "them before its own (hpc-kernels kernels do not: they run with PYTHONNOUSERSITE=1).",
            "if a kernel outside hpc-kernels misbehaves, move them away or 'export PYTHONNOUSERSITE=1'."))
    if not findings:
        findings.append(Finding("environment", OK, "no PYTHONPATH/LD_* leaks and no ~/.local site-packages."))
    return findings


def check_state_dirs() -> list[Finding]:
    """Can the directories kernels write at start be written? Jupyter's runtime directory (connection
    files: no kernel starts without it) and our state directory (instance and container records, logs)."""

    checked = (
        ("Jupyter's runtime directory", Path(jupyter_runtime_dir()),
         "Jupyter writes every kernel's connection file there: no kernel can start",
         "make it writable, or set JUPYTER_RUNTIME_DIR to a writable directory (e.g. a directory in "
         "$SCRATCH) before starting Jupyter."),
        ("hpc-kernels' state directory", paths.state_dir(),
         "shared instances and Docker/Podman kernels cannot start, builds cannot write their logs",
         "make it writable (is your home full or read-only? 'diskusage_report' on DRAC clusters), or set "
         "HPC_KERNELS_STATE to a writable directory in the environment Jupyter starts from and in your shell."),
    )
    findings = []
    for label, directory, effect, fix in checked:
        problem = _unwritable(directory)
        if problem:
            findings.append(Finding("state-dirs", FAIL, f"{label} {directory} {problem}: {effect}.", fix))
    if not findings:
        shown = ", ".join(str(d) for _label, d, _effect, _fix in checked)
        findings.append(Finding("state-dirs", OK, f"writable: {shown}."))
    return findings


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be written (or created), None when it can. Creates nothing: the nearest
    existing ancestor must be a writable directory."""
    path = directory
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"cannot be created: {path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable" if path == directory else f"cannot be created: {path} is not writable"
    return None


