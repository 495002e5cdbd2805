"""Checks of one kernel: its image, binds, the Python inside the image, GPUs, Slurm, its environment."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from jupyter_core.paths import jupyter_config_path

import hpc_kernels.runtimes.apptainer.cli as apptainer
import hpc_kernels.runtimes.job.script as jobkernel
from hpc_kernels import group, kernelspec, proc
from hpc_kernels.build import imagecheck, stamps
from hpc_kernels.doctor.base import FAIL, LEAKY_VARS, OK, WARN, Context, Finding, _last_line
from hpc_kernels.errors import HpcKernelsError, ToolError
from hpc_kernels.kernelspec import launch_spec
from hpc_kernels.model import KernelEntry, Runtime
from hpc_kernels.runtimes.apptainer.cli import gpu_flag

# ----------------------------------------------------------------------------- kernel checks


def check_image(entry: KernelEntry) -> Finding:
    """Does the kernel's image exist, and is it built from the current recipe?"""
    if entry.runtime != Runtime.APPTAINER:
        return Finding("image", OK, f"{entry.runtime} image {entry.container_image} (not checked).",
                       kernel=entry.name)
    state = stamps.image_state(entry)
    if state.status == "unreadable":
        why = group.explain_unreadable(entry.image) or f"you cannot read {entry.image}"
        return Finding("image", FAIL, f"the image {entry.image} cannot be used by you: {why}",
                       "the kernel cannot start for you until that is fixed (see the sentence above).", entry.name)
    if state.status == "unchecked":
        unread = [p for p in (entry.recipe, stamps.stamp_path(entry.image)) if p is not None]
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
    if entry.runtime != Runtime.APPTAINER or not entry.binds:
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
    if entry.runtime != Runtime.APPTAINER:
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


