"""The watcher of an Apptainer exec-mode kernel: nothing of the kernel outlives it, and it does not
outlive the Jupyter process that started it.

Why (measured with Apptainer 1.4, unprivileged, the SIF mounted with ``squashfuse_ll``): the launcher
``exec``s Apptainer, whose starter (``Apptainer runtime parent: IMAGE``, still the launcher's pid) runs
``squashfuse_ll`` as a child in a process group of its own. A SIGKILL of the starter (jupyter_client's
hard kill is SIGKILL to the launcher's process group; the OOM killer picks one pid) ends the kernel
(parent-death signal) but not ``squashfuse_ll``, which is reparented and holds the image open forever.
And when the Jupyter server dies without shutting its kernels down, nothing ends a container kernel: a
host ipykernel polls the process ``$JPY_PARENT_PID`` names (jupyter_client sets it to its own pid), but
``--cleanenv`` drops that variable and the kernel's parent here is the starter, which lives on.

So before it ``exec``s Apptainer the launcher (:func:`arm`) writes a record (:mod:`.execrecord`),
``<host state dir>/kernels/<id>.json``, sets a marker variable (``ENV_KERNEL``) in the kernel's
environment (its children inherit it, daemonised ones too), and starts this watcher fully detached. The
watcher waits (pidfds, no busy loop) on the launcher and on the Jupyter process the kernel lives for
(``$JPY_PARENT_PID``, as a host ipykernel does: the server or client that started it):

* that process is gone: it ends the kernel (SIGTERM to the runtime, which passes it on; after
  ``GRACE`` seconds SIGKILL to the kernel's process group);
* the launcher is gone, whichever way: it kills what is left of this kernel (``execrecord.leftovers``),
  then removes the record.

While it waits it adds the launcher's descendants (pid and start time) to the record, so that
``hpc-kernels gc`` (``sweep.sweep_kernels``) can finish the job of a watcher that was itself killed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from hpc_kernels import paths, procfs, selfexec
from hpc_kernels.procfs import ProcRef
from hpc_kernels.runtimes.apptainer.cli import env_prefix
from hpc_kernels.runtimes.apptainer.execrecord import (
    ENV_KERNEL,
    GRACE,
    POLL_FALLBACK,
    KernelRecord,
    clean,
    read_record,
    records_path,
    remove_record,
    write_record,
)

# why: typing is not loaded on the launcher's path (python -S)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from hpc_kernels.model import LaunchSpec

# ----------------------------------------------------------------------------- the launcher's side


def arm(spec: LaunchSpec, env: Mapping[str, str], binary: str, *,
        watch_parent: bool = True) -> tuple[dict[str, str], list[str]]:
    """Record this launcher's kernel and start its watcher; the runtime environment with the kernel's
    marker added, and warnings (the kernel still starts when it cannot be watched).

    Called by the launcher right before it ``exec``s ``binary``: on the hot path, so stdlib only, no
    subprocess, one fork. ``hpc-kernels run`` calls it too, with ``watch_parent=False``: a batch command
    must not end with the process that started it, but what Apptainer leaves when it is killed
    (``squashfuse_ll``, the command's processes) must still go.
    """
    me = procfs.proc_ref(os.getpid())
    if me is None:  # pragma: no cover - no /proc
        return dict(env), ["no /proc: this kernel's processes cannot be watched"]
    kid = os.urandom(8).hex()
    record = KernelRecord(id=kid, kernel=spec.kernel, image=spec.image, launcher=me,
                          session=os.getsid(0) == me.pid,
                          parent=procfs.jupyter_parent() if watch_parent else None, created=time.time())
    directory = records_path()
    path = os.path.join(directory, f"{kid}.json")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # per-user state: private
        write_record(record, path)
        spawn(path)
    except OSError as exc:
        return dict(env), [f"cannot watch this kernel ({exc}): if it is killed, what it leaves behind stays"]
    out = dict(env)
    out[env_prefix(binary) + ENV_KERNEL] = kid
    return out, []


# ----------------------------------------------------------------------------- the watcher


class _Waiter:
    """Waits for processes to exit: pidfds in one ``poll``, or polling /proc where there are none."""

    def __init__(self, refs: Sequence[ProcRef]) -> None:
        import select  # why: the watcher process's; the launcher imports this module for arm only

        self.poller = select.poll()
        self.fds: list[int] = []
        self.fallback = False
        for ref in refs:
            try:
                fd = os.pidfd_open(ref.pid)
            except (AttributeError, OSError):
                self.fallback = True
                continue
            self.fds.append(fd)
            self.poller.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> None:
        """Return when one of the processes exits, or after ``timeout`` seconds."""
        if self.fallback:
            timeout = min(timeout, POLL_FALLBACK)
        self.poller.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _intervals() -> Iterator[float]:
    """How long to wait between looks at the kernel's processes: often while Apptainer sets up, then rarely."""
    interval = 0.1
    while True:
        yield interval
        interval = min(interval * 1.5, 10.0)


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hpc-kernels watcher[{os.getpid()}]: {message}", flush=True)


def observe(record: KernelRecord) -> KernelRecord:
    """``record`` with the launcher's current descendants added (and those that have exited dropped)."""
    kept = {ref: comm for ref, comm in record.procs if ref.alive()}
    for child in procfs.descendants(record.launcher.pid):
        kept.setdefault(child.ref, child.comm)
    procs = tuple(sorted(kept.items(), key=lambda item: item[0].pid))
    return record if procs == record.procs else replace(record, procs=procs)


def end_kernel(record: KernelRecord, waiter: _Waiter, grace: float = GRACE) -> None:
    """Its Jupyter process is gone: SIGTERM to the runtime (Apptainer passes it on to the kernel), then
    SIGKILL to the kernel's process group (the launcher's, when it leads one) after ``grace`` seconds."""
    import signal  # why: the watcher process's; the launcher imports this module for arm only

    launcher = record.launcher
    procfs.kill([launcher], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while launcher.alive() and time.monotonic() < deadline:
        waiter.wait(deadline - time.monotonic())
    if not launcher.alive():
        return
    now = procfs.info(launcher.pid)
    if record.session and now is not None and now.ref == launcher and now.pgid == launcher.pid:
        # The group is pinned by its leader, checked alive a moment ago: it is still this kernel's.
        group = [p.ref for p in procfs.session(launcher.pid) if p.pgid == launcher.pid]
        procfs.kill([launcher, *group])
    else:
        procfs.kill([launcher])


def watch(path: str) -> int:
    """The watcher of the kernel recorded at ``path`` (see the module's docstring)."""
    try:
        record = read_record(path)
    except (OSError, ValueError) as exc:
        _log(f"cannot read {path}: {exc}")
        return 1
    if record is None:
        return 0  # gc judged the kernel finished before we started
    me = procfs.proc_ref(os.getpid())
    record = replace(record, watcher=me)
    write_record(record, path)
    parent = record.parent
    waiter = _Waiter([record.launcher] + ([parent] if parent else []))
    try:
        intervals = _intervals()
        while record.launcher.alive():
            if parent is not None and not parent.alive():
                _log(f"kernel {record.kernel} ({record.id}): the process that started it ({parent.pid}) "
                     "is gone; ending the kernel")
                end_kernel(record, waiter)
                break
            seen = observe(record)
            if seen != record:
                record = seen
                write_record(record, path)
            waiter.wait(next(intervals))
    finally:
        waiter.close()
    killed = clean(record)
    if killed:
        _log(f"kernel {record.kernel} ({record.id}) has ended; killed what it left: "
             + ", ".join(f"{p.comm} {p.pid}" for p in killed))
    remove_record(path)
    return 0


def spawn(path: str) -> None:
    """Start the watcher of the record at ``path`` (detached: see selfexec.spawn_detached)."""
    os.makedirs(paths.log_path(), mode=0o700, exist_ok=True)
    selfexec.spawn_detached(selfexec.module_argv("hpc_kernels.runtimes.apptainer.watcher", "watch", path),
                            os.path.join(paths.log_path(), "watcher.log"))


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpc_kernels.runtimes.apptainer.watcher watch RECORD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "watch":
        print("usage: python -m hpc_kernels.runtimes.apptainer.watcher watch RECORD", file=sys.stderr)
        return 2
    import signal  # why: the watcher process's; the launcher imports this module for arm only

    # The kernel's signals are not ours: a Ctrl-C or hang-up must not stop the cleanup.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return watch(args[1])


if __name__ == "__main__":
    raise SystemExit(main())
