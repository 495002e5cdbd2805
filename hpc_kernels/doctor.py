"""``hpc-kernels doctor``: every way a kernel can fail to appear in the menu or to start, with a fix.

Each check is a small function that returns :class:`Finding` objects (``ok``, ``warn`` or ``fail``,
a message saying what was seen, and a fix). Checks read the node through a :class:`Context` so a
test can point one at another hostname, ``/proc`` or ``/etc``; the probes that matter (the
runtime's version, ``import ipykernel`` inside the image, the launcher's Python) run the real
programs through :func:`hpc_kernels.proc.run`, with time-outs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError
from hpc_kernels.registry import KernelEntry, Registry

OK, WARN, FAIL = "ok", "warn", "fail"

#: Oldest Apptainer we support: unprivileged ``--fakeroot`` builds (no setuid helper) arrived in 1.1.
MIN_APPTAINER = (1, 1)
#: Oldest Singularity (the pre-Apptainer name; SingularityCE keeps it) with the ``exec`` flags we use.
MIN_SINGULARITY = (3, 7)

#: Host variables that break programs when they leak from a module environment into a kernel.
LEAKY_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "LD_LIBRARY_PATH", "LD_PRELOAD")

#: Login nodes, by name: generic ``login1``/``gra-login2``/``login-3`` and DRAC's ``narval1``-style
#: names (login nodes of the national clusters are the cluster name plus a digit). A heuristic:
#: compute nodes there are named differently (``nc10101``, ``fc30105``...).
LOGIN_RE = re.compile(
    r"^(login[-_]?\d*|[a-z0-9]+-login[-_]?\d*|"
    r"(narval|beluga|cedar|graham|fir|rorqual|nibi|trillium|niagara|killarney|vulcan|tamia)\d+)$",
    re.IGNORECASE,
)

PROBE_TIMEOUT = 60.0

#: Every check's id, in the order a report lists them (docs/troubleshooting.md explains each).
CHECKS = ("registry", "runtime", "runtime-version", "build-namespaces", "login-node", "environment",
          "state-dirs", "group", "image", "binds", "ipykernel", "gpu", "slurm-job", "kernel-env", "kernelspec",
          "launcher")


@dataclass(frozen=True)
class Finding:
    """What one check saw: ``status`` is ok, warn or fail; ``fix`` says what to do about it."""

    check: str
    status: str
    message: str
    fix: str = ""
    kernel: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Context:
    """What the checks read from the node (the real one by default; tests may point elsewhere)."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    hostname: str = field(default_factory=paths.hostname)
    uid: int = field(default_factory=os.getuid)
    user: str = field(default_factory=lambda: _user_name())
    home: Path = field(default_factory=Path.home)
    proc_root: Path = Path("/proc")
    etc_root: Path = Path("/etc")
    exists: Callable[[str], bool] = os.path.exists
    probe_timeout: float = PROBE_TIMEOUT


@dataclass(frozen=True)
class Report:
    """All findings of one doctor run, plus the directories Jupyter searches for kernelspecs."""

    findings: tuple[Finding, ...]
    kernel_dirs: tuple[str, ...]
    registry: str | None

    @property
    def failed(self) -> bool:
        """True when at least one check failed."""
        return any(f.status == FAIL for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for ``doctor --json``."""
        counts = {s: sum(f.status == s for f in self.findings) for s in (OK, WARN, FAIL)}
        return {"ok": not self.failed, "counts": counts, "registry": self.registry,
                "jupyter_kernel_dirs": list(self.kernel_dirs),
                "findings": [f.to_json() for f in self.findings]}


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


# ----------------------------------------------------------------------------- host checks


def check_runtime(ctx: Context, runtime: str = "apptainer",
                  fallbacks: Mapping[str, str] | None = None) -> tuple[Finding, str | None]:
    """Which container program the kernels will use; returns the finding and the binary (None when none).

    For Apptainer this follows the launcher: ``$HPC_KERNELS_APPTAINER``, ``apptainer`` or ``singularity`` on
    PATH, else the one each kernelspec recorded when it was installed (``fallbacks``: installed kernel name
    to that path), so a JupyterHub session without ``module load apptainer`` is reported as it is.
    """
    import shutil

    if runtime == "apptainer":
        import hpc_kernels.runtimes.apptainer.cli as apptainer

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
    import hpc_kernels.runtimes.apptainer.cli as apptainer

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
    from hpc_kernels import proc

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
    if name == "apptainer":
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
    buildable = [e for e in entries if e.buildable and e.runtime == "apptainer"]
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
    from jupyter_core.paths import jupyter_runtime_dir

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


# ----------------------------------------------------------------------------- kernel checks


def check_image(entry: KernelEntry) -> Finding:
    """Does the kernel's image exist, and is it built from the current recipe?"""
    from hpc_kernels import build

    if entry.runtime != "apptainer":
        return Finding("image", OK, f"{entry.runtime} image {entry.container_image} (not checked).",
                       kernel=entry.name)
    state = build.image_state(entry)
    if state.status == "unreadable":
        from hpc_kernels import group

        why = group.explain_unreadable(entry.image) or f"you cannot read {entry.image}"
        return Finding("image", FAIL, f"the image {entry.image} cannot be used by you: {why}",
                       "the kernel cannot start for you until that is fixed (see the sentence above).", entry.name)
    if state.status == "unchecked":
        from hpc_kernels import group

        unread = [p for p in (entry.recipe, build.stamp_path(entry.image)) if p is not None]
        why = next((w for w in (group.explain_unreadable(p) for p in unread) if w), "its recipe cannot be read")
        return Finding("image", WARN, f"the image {entry.image} is readable, but whether it is up to date cannot be "
                       f"told: {why}", "the kernel starts; only the check of its recipe is skipped.", entry.name)
    if state.status == "missing":
        return Finding("image", FAIL, f"the image {entry.image} has not been built.",
                       f"hpc-kernels build {entry.name}", entry.name)
    if state.status == "external-missing":
        return Finding("image", FAIL, f"the image {entry.image} named in the registry does not exist.",
                       "fix 'image:' in the registry (paths are relative to the registry file), or add a "
                       "'def:' recipe and build it.", entry.name)
    if state.status == "damaged":
        return Finding("image", FAIL, f"the image {entry.image} is not the file hpc-kernels built: its size or "
                       "modification time differs from the build record (truncated by a full disk or quota, "
                       "or overwritten).", f"hpc-kernels build {entry.name}", entry.name)
    if state.status == "stale":
        return Finding("image", WARN, f"the image {entry.image} is older than its recipe or inputs.",
                       f"hpc-kernels build {entry.name}", entry.name)
    if state.status == "foreign":
        return Finding("image", WARN, f"the image {entry.image} was not built by hpc-kernels from "
                       f"{entry.recipe}; 'hpc-kernels build' will not overwrite it.",
                       "keep it (the kernel uses it as is), or move it away and run "
                       f"'hpc-kernels build {entry.name}'.", entry.name)
    return Finding("image", OK, f"image {entry.image} ({state.status}).", kernel=entry.name)


def check_binds(entry: KernelEntry, ctx: Context) -> Finding | None:
    """Apptainer refuses to start a container whose bind source does not exist on this node."""
    if entry.runtime != "apptainer" or not entry.binds:
        return None
    missing = []
    for bind in entry.binds:
        # Expanded like the launcher does, but with this check's environment.
        source = _expandvars(bind, ctx.environ).split(":", 1)[0]
        if not source or not ctx.exists(source):
            missing.append(f"{bind} ({source or 'empty'})" if source != bind.split(":", 1)[0] else bind)
    if not missing:
        return Finding("binds", OK, f"bind sources exist: {', '.join(entry.binds)}.", kernel=entry.name)
    return Finding("binds", FAIL,
                   f"bind source(s) missing on {ctx.hostname}: {', '.join(missing)}; Apptainer will refuse "
                   "to start the kernel ('mount source doesn't exist').",
                   f"create them, or remove them from 'binds' of kernel '{entry.name}' (a variable in a "
                   "bind, like $SLURM_TMPDIR, must be set where the kernel starts).", entry.name)


def _expandvars(text: str, environ: Mapping[str, str]) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}",
                  lambda m: environ.get(m.group(1) or m.group(2), m.group(0)), text)


def _launcher_prefix(argv: list[str]) -> list[str]:
    """The kernelspec's argv up to the launcher itself: the interpreter, its flags, then the script (or
    ``-m MODULE``); without the kernel.json and connection-file arguments."""
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 1
    return argv[:i + 2] if i < len(argv) and argv[i] == "-m" else argv[:i + 1]


def _source_exists(bind: str, ctx: Context) -> bool:
    """Does the source of ``bind`` (variables expanded like the launcher does) exist on this node?"""
    source = _expandvars(bind, ctx.environ).split(":", 1)[0]
    return bool(source) and ctx.exists(source)


def check_ipykernel(entry: KernelEntry, binary: str | None, ctx: Context) -> Finding | None:
    """Run the kernel's Python inside the image, as the launcher would, and import ipykernel there.

    Never skipped in silence: without a runtime or an image the finding says it was not checked and why. A
    bind source missing on this node (a ``binds`` failure of its own) is left out of the probe.
    """
    from hpc_kernels import imagecheck

    if entry.runtime != "apptainer":
        return None
    if not entry.image.exists():
        return Finding("ipykernel", WARN, f"not checked: the image {entry.image} does not exist (see 'image').",
                       "build or fix the image, then run doctor again.", entry.name)
    if not os.access(entry.image, os.R_OK):
        return None  # check_image says who may read it (a group's image the group cannot read)
    if binary is None:
        return Finding("ipykernel", WARN, "not checked: no Apptainer to run the image with (see 'runtime').",
                       "make Apptainer available ('module load apptainer'), then run doctor again.", entry.name)
    command = imagecheck.kernel_command(entry)
    program = command[0]
    if not imagecheck.is_python(program):
        return Finding("ipykernel", OK, f"'{program}' is not a Python: not probed.", kernel=entry.name)
    code = imagecheck.import_code(command)
    import hpc_kernels.runtimes.apptainer.cli as apptainer
    from hpc_kernels import kernelspec, proc

    missing = [b for b in entry.binds if not _source_exists(b, ctx)]
    without = f" (without the missing bind source(s) {', '.join(missing)})" if missing else ""
    spec = dataclasses.replace(kernelspec.launch_spec(entry), command=(program, "-c", code),
                               binds=tuple(b for b in entry.binds if b not in missing))
    with tempfile.NamedTemporaryFile(prefix="hpck-doctor-", suffix=".json") as conn:
        argv, env, _warnings = apptainer.exec_command(spec, conn.name, binary, ctx.environ, ctx.exists)
        try:
            result = proc.run(argv, check=False, env=env, timeout=ctx.probe_timeout)
        except ToolError as exc:
            return Finding("ipykernel", WARN, f"probing the image timed out: {exc}",
                           "try again on a less busy node (or inside a job).", entry.name)
    out = (result.stderr + result.stdout).strip()
    if result.returncode == 0:
        return Finding("ipykernel", OK, f"'{program} -c \"{code}\"' works in the image{without}.",
                       kernel=entry.name)
    if imagecheck.classify(result.returncode, out) == "missing":
        fix = (f"set 'command:' of kernel '{entry.name}' to the image's Python, e.g. [python3, -m, "
               "ipykernel_launcher, -f, \"{connection_file}\"], then 'hpc-kernels install "
               f"{entry.name}'." if entry.command_given else
               f"run 'hpc-kernels install {entry.name}': it looks for the image's Python (python3, then python) "
               "and uses it (an image with neither needs Python and ipykernel in its recipe's %post).")
        return Finding("ipykernel", FAIL, f"the kernel's program '{program}' does not exist in {entry.image}.",
                       fix, entry.name)
    if "ModuleNotFoundError" in out or "ImportError" in out:
        return Finding("ipykernel", FAIL,
                       f"'{code}' fails in {entry.image}: {_last_line(out)}",
                       f"add ipykernel to the recipe's %post (pip install ipykernel, or apt-get install "
                       f"python3-ipykernel), then 'hpc-kernels build {entry.name}'.", entry.name)
    return Finding("ipykernel", FAIL, f"running '{program}' in {entry.image} failed (exit "
                   f"{result.returncode}): {_last_line(out)}",
                   f"try it yourself: {' '.join(argv)}", entry.name)


def check_gpu(entry: KernelEntry, ctx: Context) -> Finding | None:
    """A kernel that asks for a GPU vendor on a node without that GPU runs without one."""
    if entry.gpu not in ("nvidia", "rocm") or entry.job is not None:
        return None  # a job kernel's GPU is on the node of its job, not here
    from hpc_kernels.runtimes.apptainer.cli import gpu_flag

    flag, warning = gpu_flag(entry.gpu, ctx.exists)
    if flag:
        return Finding("gpu", OK, f"{entry.gpu} GPU present: the kernel gets {flag}.", kernel=entry.name)
    in_job = bool(ctx.environ.get("SLURM_JOB_ID"))
    return Finding(
        "gpu", FAIL if in_job else WARN,
        f"{warning} ({ctx.hostname}{', in a Slurm job' if in_job else ''}): "
        "the kernel would start without it.",
        "start the session on a GPU node (e.g. JupyterHub's GPU option, or 'salloc --gpus=1'); "
        "'gpu: auto' uses a GPU only when the node has one.", entry.name)


def check_slurm_job(entry: KernelEntry, ctx: Context) -> Finding | None:
    """A job kernel's allocation, asked of Slurm with ``sbatch --test-only``: an account it does not know,
    a partition that does not exist, a request over the queue's limits are said before the first start."""
    if entry.job is None:
        return None
    import shutil

    import hpc_kernels.runtimes.job.script as jobkernel
    from hpc_kernels.kernelspec import launch_spec

    summary = entry.job.summary()
    if shutil.which("sbatch", path=ctx.environ.get("PATH")) is None:
        return Finding("slurm-job", FAIL, f"kernel '{entry.name}' runs in a Slurm job of its own ({summary}), but "
                       "'sbatch' is not on PATH here.",
                       "start Jupyter where Slurm's commands are (a login node, or a JupyterHub session of the "
                       "cluster), or 'module load' your site's Slurm module.", entry.name)
    try:
        answer = jobkernel.test_only(launch_spec(entry))
    except HpcKernelsError as exc:
        return Finding("slurm-job", FAIL, f"Slurm would refuse the job of kernel '{entry.name}' ({summary}): "
                       f"{str(exc).removeprefix('sbatch rejected the job: ')}",
                       "fix 'job:' in the registry (account, partition, time, mem, gpus) and run "
                       f"'hpc-kernels install {entry.name}' again; 'sinfo -s' lists the partitions, "
                       "'sacctmgr show assoc user=$USER' your accounts.", entry.name)
    return Finding("slurm-job", OK, f"Slurm accepts the job of kernel '{entry.name}' ({summary}): {answer}",
                   kernel=entry.name)


def check_kernel_env(entry: KernelEntry) -> Finding | None:
    """A kernel that passes a leaky host variable into its container on purpose."""
    import fnmatch

    leaked = sorted({v for v in LEAKY_VARS for pat in entry.pass_env if fnmatch.fnmatchcase(v, pat)})
    if not leaked:
        return None
    return Finding("kernel-env", WARN,
                   f"kernel '{entry.name}' passes {', '.join(leaked)} from the host into the container: "
                   "host libraries and packages built for another system then load inside it.",
                   f"remove them from 'pass_env' of '{entry.name}' (set fixed values with 'env' instead).",
                   entry.name)


def disable_user_config_source(ctx: Context) -> str | None:
    """Where JupyterHub's ``disable_user_config`` (which hides kernels under $HOME) is seen to be on."""
    value = ctx.environ.get("JUPYTERHUB_DISABLE_USER_CONFIG", "")
    if value.lower() in ("1", "true", "yes"):
        return f"JUPYTERHUB_DISABLE_USER_CONFIG={value}"
    from jupyter_core.paths import jupyter_config_path

    pattern = re.compile(r"disable_user_config\"?\s*[=:]\s*(True|true|1)\b")
    candidates = [Path(d) for d in jupyter_config_path()] + [ctx.etc_root / "jupyterhub"]
    for directory in candidates:
        for path in sorted(directory.glob("jupyter*_config.*")) if directory.is_dir() else []:
            try:
                if pattern.search(path.read_text(errors="replace")):
                    return str(path)
            except OSError:
                continue
    return None


def check_kernelspec(entry: KernelEntry, ctx: Context) -> Finding:
    """Is the kernelspec where Jupyter looks, ours, and not hidden by JupyterHub?"""
    from hpc_kernels import specdirs

    found = specdirs.visible(entry.name)
    dirs = ", ".join(str(d) for d in specdirs.search_dirs())
    if found is None:
        from hpc_kernels import group

        for spec in specdirs.unreadable(entry.name):
            why = group.explain_unreadable(spec / "kernel.json")
            if why:
                return Finding("kernelspec", FAIL, f"Jupyter does not list the kernelspec {spec}: {why}",
                               "restart your JupyterLab session once it is fixed.", entry.name)
        module = _module_hint(entry, ctx)
        if module:
            return Finding("kernelspec", FAIL,
                           f"no kernelspec '{entry.name}' in the directories Jupyter searches: {dirs}; it is "
                           f"published in the group tree {module[0]}, whose module is not loaded here.",
                           f"{module[1]}, then restart your JupyterLab session (in JupyterHub: put the 'module "
                           "use' line in ~/.bashrc, or load the module in the Software Modules panel).", entry.name)
        return Finding("kernelspec", FAIL,
                       f"no kernelspec '{entry.name}' in the directories Jupyter searches: {dirs}.",
                       f"run 'hpc-kernels install {entry.name}' (if you installed it with --prefix DIR, add "
                       "DIR/share/jupyter to JUPYTER_PATH: 'module load container-kernels' does that), then "
                       "restart your JupyterLab session.", entry.name)
    hidden = [p for p in specdirs.copies(entry.name) if p != found]
    if not specdirs.is_ours(found):
        ours = [p for p in hidden if specdirs.is_ours(p)]
        mine = f"; the one hpc-kernels wrote, {ours[0]}, is hidden by it" if ours else ""
        return Finding("kernelspec", FAIL,
                       f"the kernelspec Jupyter uses for '{entry.name}' ({found}) was not written by "
                       f"hpc-kernels{mine}.",
                       f"rename the kernel in the registry, or remove {found} yourself.", entry.name)
    hub = disable_user_config_source(ctx)
    if hub and _under(found, ctx.home):
        return Finding("kernelspec", FAIL,
                       f"kernelspec {found} is under your home, which JupyterHub hides "
                       f"(disable_user_config is on: {hub}).",
                       f"install it outside $HOME ('hpc-kernels install {entry.name} --prefix /project/...') "
                       "and put that prefix's share/jupyter on JUPYTER_PATH "
                       "('module load container-kernels'), then restart your JupyterLab session.", entry.name)
    if hidden:
        fixes = [specdirs.command("uninstall", entry.name, p) if specdirs.is_ours(p) else None
                 for p in hidden]
        fix = "; ".join(f"'{cmd}'" if cmd else f"remove {p} yourself" for cmd, p in zip(fixes, hidden))
        return Finding("kernelspec", WARN,
                       f"installed at {found}, which Jupyter uses; {len(hidden)} other cop"
                       f"{'y' if len(hidden) == 1 else 'ies'} of '{entry.name}' hidden by it: "
                       f"{', '.join(str(p) for p in hidden)}.",
                       f"keep one copy: remove the hidden one(s) ({fix}), or update the one Jupyter uses.",
                       entry.name)
    return Finding("kernelspec", OK,
                   f"installed at {found} (if JupyterLab was already open, restart your session to see it).",
                   kernel=entry.name)


def _module_hint(entry: KernelEntry, ctx: Context) -> tuple[Path, str] | None:
    """For a kernel published in a group tree that Jupyter does not see: the tree and the module command
    that shows it (``module use`` only when the tree's modulefiles are not on MODULEPATH yet)."""
    from hpc_kernels import group

    tree = group.tree_of_registry(entry.origin)
    if tree is None or not os.path.isfile(tree.prefix / "share/jupyter/kernels" / entry.name / "kernel.json"):
        return None
    used = os.path.normpath(tree.modulefiles) in {os.path.normpath(p) for p in
                                                  ctx.environ.get("MODULEPATH", "").split(":") if p}
    command = f"module load {tree.module_name}"
    return tree.root, command if used else f"module use {tree.modulefiles} && {command}"


def check_group(registry: Registry, ctx: Context) -> list[Finding]:
    """A registry of a group tree (or one that extends it): is this user in the group, does the tree
    let the group in, is its module loaded?"""
    from hpc_kernels import access, group

    trees: list[group.GroupTree] = []
    for path in (registry.path, registry.base.path if registry.base else None):
        tree = group.tree_of_registry(path)
        if tree is not None and tree.root not in {t.root for t in trees}:
            trees.append(tree)
    findings = []
    for tree in trees:
        what = f"the group tree {tree.root} of {tree.group}"
        try:
            owner = os.stat(tree.root).st_uid
        except OSError:
            owner = -1
        if tree.gid >= 0 and not access.in_group(tree.gid) and owner != ctx.uid:
            if access.listed_in_group(tree.gid, ctx.user):
                findings.append(Finding("group", FAIL, f"{what}: you were added to {tree.group} after this "
                                        "session started, so it does not count yet.",
                                        "log out and in again (a new JupyterHub session too), or "
                                        f"'newgrp {tree.group}'."))
            else:
                findings.append(Finding("group", FAIL,
                                        f"{what}: you ({ctx.user}) are not in the group {tree.group}.",
                                        f"ask {tree.maintainer} or your PI to add you (on DRAC the PI adds group "
                                        "members in CCDB), then log in again."))
            continue
        closed = _closed_entries(tree)
        if closed:
            shown = ", ".join(str(p) for p in closed[:3]) + (" …" if len(closed) > 3 else "")
            findings.append(Finding("group", WARN, f"{what}: {len(closed)} entries of it are not readable by the "
                                    f"group ({shown}).",
                                    f"{tree.maintainer} can run 'hpc-kernels group init {tree.root}' (it repairs "
                                    "the modes of their files); files of other users: their owners, with chmod."))
            continue
        jupyter = os.path.normpath(tree.prefix / "share" / "jupyter")
        loaded = jupyter in {os.path.normpath(p) for p in ctx.environ.get("JUPYTER_PATH", "").split(":") if p}
        mode = "members may write" if tree.members_write else f"maintained by {tree.maintainer}"
        if loaded:
            findings.append(Finding("group", OK, f"{what} ({mode}): you are in the group, it is readable by the "
                                    f"group, and its module is loaded."))
        else:
            used = os.path.normpath(tree.modulefiles) in {os.path.normpath(p) for p in
                                                          ctx.environ.get("MODULEPATH", "").split(":") if p}
            command = f"module load {tree.module_name}"
            findings.append(Finding("group", WARN, f"{what} ({mode}): its kernels are not on Jupyter's search path "
                                    "here (its module is not loaded).",
                                    command if used else f"module use {tree.modulefiles} && {command} (and the "
                                    "'module use' line in ~/.bashrc, for JupyterHub's Software Modules panel)."))
    return findings


#: A tree with more entries than this is not searched to the end by ``doctor`` (a big venv inside it).
_CLOSED_SCAN_LIMIT = 50000


def _closed_entries(tree: Any) -> list[Path]:
    """Entries of the tree the group cannot read (directories: enter); world-writable ones too."""
    import stat

    closed: list[Path] = []
    seen = 0
    for directory, dirs, files in os.walk(tree.root):
        for name in [*dirs, *files]:
            seen += 1
            path = Path(directory) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            need = 0o050 if stat.S_ISDIR(st.st_mode) else 0o040
            if st.st_mode & 0o002 or (st.st_gid == tree.gid and st.st_mode & need != need) or \
                    (st.st_gid != tree.gid and st.st_mode & (need >> 3) != need >> 3):
                closed.append(path)
        if seen > _CLOSED_SCAN_LIMIT:
            break
    return closed


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_installed(name: str, kdir: Path, entry: KernelEntry | None, ctx: Context) -> list[Finding]:
    """Our installed kernel.json: does its launcher Python exist and import us, does its image exist?"""
    from hpc_kernels import kernelspec, proc
    from hpc_kernels.launchspec import KernelSpecError, read_kernel_json

    try:
        data, spec = read_kernel_json(str(kdir / "kernel.json"))
    except KernelSpecError as exc:  # hand-edited or half-written: the sentence names the field
        return [Finding("launcher", FAIL, str(exc), f"hpc-kernels install {name}", name)]
    except OSError as exc:
        return [Finding("launcher", FAIL, f"cannot read {kdir / 'kernel.json'}: {exc.strerror or exc}.",
                        f"hpc-kernels install {name}", name)]
    findings: list[Finding] = []
    raw_argv = data.get("argv")
    if not (isinstance(raw_argv, list) and raw_argv and all(isinstance(a, str) for a in raw_argv)):
        # Jupyter itself cannot start such a kernel; nothing below can be probed.
        return [Finding("launcher", FAIL, f"the kernelspec {kdir / 'kernel.json'} is damaged: 'argv' must be "
                        "a list of strings (the launcher's command line).", f"hpc-kernels install {name}", name)]
    argv: list[str] = raw_argv
    python = argv[0]
    from hpc_kernels import group

    closed = [why for why in (group.explain_unreadable(Path(python), os.X_OK) if python else None,
                              *(group.explain_unreadable(Path(a)) for a in _launcher_prefix(argv)[1:]
                                if os.path.isabs(a))) if why]
    if closed:
        findings.append(Finding("launcher", FAIL, f"kernelspec {kdir} starts hpc-kernels' launcher "
                                f"({' '.join(_launcher_prefix(argv))}), which you cannot run: {closed[0]}",
                                "the maintainer should install hpc-kernels where the group can read it (a venv in "
                                "the group tree, then 'hpc-kernels group init' on the tree and 'hpc-kernels install' "
                                "again).", name))
    elif not (python and os.path.isfile(python) and os.access(python, os.X_OK)):
        findings.append(Finding("launcher", FAIL,
                                f"kernelspec {kdir} starts '{python}', which does not exist any more "
                                "(was the virtualenv that installed it removed?).",
                                f"reinstall hpc-kernels, then 'hpc-kernels install {name}'.", name))
    else:
        try:
            # Start the launcher exactly as the kernel does (python -I -S .../launch.py, or the older
            # python -I -m hpc_kernels.launch) but without its two arguments: once it has imported what
            # it needs it prints its usage and exits 2; anything else is the reason a kernel would not start.
            probe = proc.run(_launcher_prefix(argv), check=False, env=ctx.environ, timeout=ctx.probe_timeout)
            problem = "" if probe.returncode == 2 and "usage:" in probe.stderr else (
                _last_line(probe.stderr) or f"exit code {probe.returncode}")
        except ToolError as exc:
            problem = str(exc)
        if problem:
            findings.append(Finding("launcher", FAIL,
                                    f"the launcher ({' '.join(_launcher_prefix(argv))}) does not start: "
                                    f"{problem}",
                                    f"reinstall hpc-kernels into that environment, or 'hpc-kernels install "
                                    f"{name}' from the one you use now.", name))
        else:
            findings.append(Finding("launcher", OK, f"launcher {' '.join(_launcher_prefix(argv))} starts.",
                                    kernel=name))
    if spec.runtime == "apptainer" and not os.path.exists(spec.image) and (
            entry is None or spec.image != str(entry.image)) and group.explain_unreadable(Path(spec.image)) is None:
        findings.append(Finding("launcher", FAIL,
                                f"kernelspec {kdir} points at the image {spec.image}, which does not exist.",
                                f"'hpc-kernels install {name}' again (the registry's image path changed), or "
                                f"'hpc-kernels uninstall {name}' if the kernel is gone.", name))
    if entry is not None:
        wanted = kernelspec.launch_spec(entry)
        drift = [f for f in ("image", "command", "binds", "env", "pass_env", "gpu", "mode", "runtime_args")
                 if getattr(spec, f) != getattr(wanted, f)]
        if drift:
            findings.append(Finding("launcher", WARN,
                                    f"the installed kernelspec differs from the registry "
                                    f"({', '.join(drift)}).",
                                    f"hpc-kernels install {name}", name))
    return findings


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ----------------------------------------------------------------------------- all of it


def kernel_findings(entry: KernelEntry, apptainer_bin: str | None, installed: Path | None,
                    ctx: Context) -> list[Finding]:
    """Every per-kernel check, in report order; checks that do not apply return nothing."""
    binds = check_binds(entry, ctx)
    probe = check_ipykernel(entry, apptainer_bin, ctx)
    found = [check_image(entry), binds, probe, check_gpu(entry, ctx), check_slurm_job(entry, ctx),
             check_kernel_env(entry),
             check_kernelspec(entry, ctx)]
    result = [f for f in found if f is not None]
    if installed is not None:
        result += check_installed(entry.name, installed, entry, ctx)
    return result


def run_checks(registry: Registry | None, names: list[str] | None = None, ctx: Context | None = None,
               registry_problem: str | None = None) -> Report:
    """Run every check for the named kernels (default: the whole registry and every kernelspec of ours)."""
    from hpc_kernels import specdirs

    ctx = ctx or Context()
    findings: list[Finding] = []
    if registry_problem:
        findings.append(Finding("registry", FAIL if names else WARN, registry_problem,
                                "pass --registry PATH or set HPC_KERNELS_REGISTRY."))
    entries: list[KernelEntry] = []
    if registry is not None:
        entries = list(registry.kernels)
        if names:
            entries = [registry.get(n) for n in names]
        findings.append(Finding("registry", OK, f"{registry.path} (found via {registry.source}), "
                                                f"{len(registry.kernels)} kernel(s)."))
    installed = specdirs.installed_ours()
    runtimes = sorted({e.runtime for e in entries}) or ["apptainer"]
    fallbacks = runtime_hints(installed, {e.name for e in entries} if names else None)
    binaries: dict[str, str | None] = {}
    for runtime in runtimes:
        finding, binaries[runtime] = check_runtime(ctx, runtime, fallbacks)
        findings.append(finding)
    apptainer_bin = binaries.get("apptainer")
    if apptainer_bin:
        findings.append(check_runtime_version(apptainer_bin, ctx))
    optional = check_build_namespaces(ctx, entries)
    if optional:
        findings.append(optional)
    findings.append(check_login_node(ctx))
    findings += check_environment(ctx)
    findings += check_state_dirs()
    if registry is not None:
        findings += check_group(registry, ctx)
    for entry in entries:
        findings += kernel_findings(entry, apptainer_bin, installed.get(entry.name), ctx)
    if not names:
        known = {e.name for e in entries}
        for name, kdir in installed.items():
            if name not in known:
                findings += check_installed(name, kdir, None, ctx)
    return Report(tuple(findings), tuple(str(d) for d in specdirs.search_dirs()),
                  str(registry.path) if registry else None)


def runtime_hints(installed: Mapping[str, Path], only: set[str] | None = None) -> dict[str, str]:
    """The Apptainer each installed kernel's launcher falls back to (recorded at install time; "" if none)."""
    from hpc_kernels.launchspec import read_kernel_json

    hints: dict[str, str] = {}
    for name, kdir in installed.items():
        if only is not None and name not in only:
            continue
        try:
            _data, spec = read_kernel_json(str(kdir / "kernel.json"))
        except (OSError, ValueError):
            continue
        if spec.runtime == "apptainer":
            hints[name] = spec.runtime_hint
    return hints


def load_registry(explicit: str | None) -> tuple[Registry | None, str | None]:
    """The registry, or the sentence saying why there is none (doctor runs anyway)."""
    from hpc_kernels import registry

    try:
        return registry.load(explicit), None
    except HpcKernelsError as exc:
        return None, str(exc)


def report_json(report: Report) -> str:
    """``doctor --json`` text."""
    return json.dumps(report.to_json(), indent=2)
