"""The launcher's side of a shared instance: attach a kernel to it (starting it first, under its lock)
and ``execve`` ``apptainer exec instance://NAME``; :func:`plan` is what that would run, for ``show``.
Import-light: the launcher imports this on every instance-mode kernel start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import paths, procfs
from hpc_kernels.errors import HpcKernelsError, ToolError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.model import LaunchSpec
from hpc_kernels.procfs import ProcRef, proc_ref
from hpc_kernels.runtimes.apptainer.instance import (
    ENV_ATTACHMENT,
    ENV_INSTANCE,
    IDLE,
    KERNELS,
    RECORD,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Identity,
    connection_dir,
    identity,
    instance_dir,
    root,
)
from hpc_kernels.runtimes.apptainer.reaper import ensure_reaper
from hpc_kernels.runtimes.apptainer.records import (
    Attachment,
    InstanceRecord,
    _clear_state,
    _lock,
    clear_leftovers,
    read_record,
)
from hpc_kernels.runtimes.base import Plan

# ----------------------------------------------------------------------------- launch


def launch(spec: LaunchSpec, connection_file: str) -> int:
    """Attach a kernel to its shared instance (starting it if needed) and ``execve`` into it.

    Returns only on error.
    """
    binary = apptainer.find_binary(fallback=spec.runtime_hint)
    environ = dict(os.environ)
    cdir = connection_dir(connection_file)
    draft, _env, _warnings = apptainer.instance_start_command(spec, "NAME", cdir, "PIDFILE", binary, environ)
    ident = identity(spec, draft, environ)
    name = ident.name
    d = instance_dir(name)
    me = proc_ref(os.getpid())
    if me is None:  # pragma: no cover - /proc is not mounted
        raise HpcKernelsError("cannot read /proc/self/stat: instance mode needs Linux /proc.")
    attachment_id = f"{me.pid}-{me.start}"
    paths.private(root())  # per-user state: 0700 from the state directory down (older versions: 0755)
    with _lock(d / "lock"):
        record = read_record(d)
        if record is None or not record.running():
            if record is not None:
                # Dead (killed, node rebooted, stale state): whatever it left behind goes first (maybe
                # long after: from its starter's session only Apptainer's helpers).
                clear_leftovers(record, late=True)
                _clear_state(d)
            argv, start_env, warnings = apptainer.instance_start_command(
                spec, name, cdir, str(d / "pid"), binary, environ
            )
            for warning in warnings:
                print(f"hpc-kernels: warning: {warning}", file=sys.stderr)
            record = _start(spec, ident, d, argv, start_env, binary)
        ensure_reaper(d)
        # The Jupyter process that started us ($JPY_PARENT_PID): when it dies, the reaper ends this kernel.
        parent = procfs.jupyter_parent()
        attachment = Attachment(
            attachment_id, me.pid, me.start, os.path.abspath(connection_file), time.time(),
            parent.pid if parent else 0, parent.start if parent else 0,
        )
        atomic_write(d / KERNELS / f"{attachment_id}.json", json.dumps(asdict(attachment)) + "\n", private=True)
        with contextlib.suppress(FileNotFoundError):
            (d / IDLE).unlink()
    markers = {ENV_INSTANCE: name, ENV_ATTACHMENT: attachment_id}
    exec_argv, env = apptainer.instance_exec_command(spec, name, connection_file, binary, environ, markers)
    os.execve(exec_argv[0], exec_argv, env)
    return 1  # pragma: no cover - execve does not return


def plan(spec: LaunchSpec, connection_file: str, environ: Mapping[str, str] | None = None) -> Plan:
    """What :func:`launch` would run for ``spec`` (for ``hpc-kernels show``): the ``exec instance://``
    command, with the ``instance start`` command as a note when that instance is not running now."""
    from jupyter_core.paths import jupyter_runtime_dir  # why: for show only, never on the launcher's path

    if not os.path.exists(spec.image):
        raise HpcKernelsError(f"the instance is named after the image, which is missing ({spec.image}); "
                              f"build it with 'hpc-kernels build {spec.kernel}'.")
    binary = apptainer.find_binary(fallback=spec.runtime_hint)
    environ = dict(os.environ if environ is None else environ)
    if not os.path.isabs(connection_file):
        # Jupyter writes connection files to its runtime dir: that directory decides the instance.
        connection_file = os.path.join(jupyter_runtime_dir(), connection_file)
    cdir = connection_dir(connection_file)
    draft, _env, warnings = apptainer.instance_start_command(spec, "NAME", cdir, "PIDFILE", binary, environ)
    name = identity(spec, draft, environ).name
    argv, env = apptainer.instance_exec_command(spec, name, connection_file, binary, environ, {})
    record = read_record(instance_dir(name))
    if record is None or not record.running():
        start, _, _ = apptainer.instance_start_command(spec, name, cdir, str(instance_dir(name) / "pid"),
                                                       binary, environ)
        warnings = [*warnings, "instance not running here: the first kernel starts it with: "
                    + " ".join(shlex.quote(a) for a in start)]
    return argv, env, warnings


def _start(spec: LaunchSpec, ident: Identity, d: Path, argv: list[str], env: dict[str, str],
           binary: str) -> InstanceRecord:
    """Start the instance (we hold its lock) and record it."""
    pid_file = d / "pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    try:
        apptainer.start_instance(argv, env, timeout=START_TIMEOUT)
    except ToolError:
        # Apptainer still lists an instance of this name that our record did not know or thought
        # dead (its state outlived a crash): nothing of ours can be attached to it; replace it.
        if not apptainer.list_instances(binary, ident.name):
            raise
        apptainer.stop_instance(binary, ident.name, force=True, timeout=STOP_TIMEOUT)
        apptainer.start_instance(argv, env, timeout=START_TIMEOUT)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        raise HpcKernelsError(
            f"Apptainer started instance '{ident.name}' but wrote no pid file {pid_file}."
        ) from None
    proc = proc_ref(pid)
    if proc is None:
        raise HpcKernelsError(
            f"instance '{ident.name}' exited right after it started; "
            "see its log in ~/.apptainer/instances/logs."
        )
    starter = _starter_of(proc.pid)
    record = InstanceRecord(
        name=ident.name, kernel=spec.kernel, image=spec.image, user=ident.user, host=ident.host,
        job=ident.job, pid=proc.pid, pid_start=proc.start, started_at=time.time(),
        idle_timeout=spec.idle_timeout, binary=binary,
        starter_pid=starter.pid if starter else 0, starter_start=starter.start if starter else 0,
    )
    atomic_write(d / RECORD, json.dumps(asdict(record), indent=1) + "\n", private=True)
    return record


def _starter_of(pid: int) -> ProcRef | None:
    """The ``Apptainer instance`` process above the instance's ``pid``: it leads the session its helpers
    run in (None when it does not, e.g. another runtime's layout)."""
    me = procfs.info(pid)
    parent = procfs.info(me.ppid) if me is not None and me.ppid > 1 else None
    if parent is None or parent.zombie or parent.sid != parent.pid:
        return None
    return parent.ref
