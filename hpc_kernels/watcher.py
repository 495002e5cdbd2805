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

So before it ``exec``s Apptainer the launcher (:func:`arm`) writes a record,
``<host state dir>/kernels/<id>.json``, sets a marker variable (:data:`ENV_KERNEL`) in the kernel's
environment (its children inherit it, daemonised ones too), and starts this watcher fully detached. The
watcher waits (pidfds, no busy loop) on the launcher and on the Jupyter process the kernel lives for
(``$JPY_PARENT_PID``, as a host ipykernel does: the server or client that started it):

* that process is gone: it ends the kernel (SIGTERM to the runtime, which passes it on; after
  :data:`GRACE` seconds SIGKILL to the kernel's process group);
* the launcher is gone, whichever way: it kills what is left of this kernel (:func:`leftovers`), then
  removes the record.

While it waits it adds the launcher's descendants (pid and start time) to the record, so that
``hpc-kernels gc`` (:func:`sweep`) can finish the job of a watcher that was itself killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from hpc_kernels import paths, procfs, selfexec
from hpc_kernels.procfs import ProcInfo, ProcRef

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hpc_kernels.gc import Finding
    from hpc_kernels.model import LaunchSpec

#: Set inside the container of every exec-mode kernel: its record's id.
ENV_KERNEL = "HPC_KERNELS_KERNEL_ID"
FORMAT = 1
#: Seconds a kernel whose Jupyter process died gets to exit on SIGTERM before SIGKILL.
GRACE = 3.0
#: After the launcher has gone, a second look this much later (a helper may still be on its way out).
SETTLE = 0.5
#: gc leaves a record this young alone while its watcher has not said it runs (it is starting).
START_GRACE = 10.0
#: Without pidfds (Linux < 5.3) the watcher looks this often whether the launcher or parent died.
POLL_FALLBACK = 0.5


@dataclass(frozen=True)
class KernelRecord:
    """What the watcher of one exec-mode kernel owns (``kernels/<id>.json``)."""

    id: str
    kernel: str
    image: str
    #: The launcher, which became the Apptainer starter: the pid jupyter_client knows.
    launcher: ProcRef
    #: The launcher leads its own session (jupyter_client starts kernels so): the session is the kernel's.
    session: bool
    #: The Jupyter process the kernel lives for ($JPY_PARENT_PID: the server or client that started it).
    parent: ProcRef | None
    created: float
    watcher: ProcRef | None = None
    #: The launcher's descendants seen so far (the kernel, ``squashfuse_ll``...), with their names.
    procs: tuple[tuple[ProcRef, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        def ref(r: ProcRef | None) -> list[int] | None:
            return [r.pid, r.start] if r else None

        return {"format": FORMAT, "id": self.id, "kernel": self.kernel, "image": self.image,
                "launcher": ref(self.launcher), "session": self.session, "parent": ref(self.parent),
                "created": self.created, "watcher": ref(self.watcher),
                "procs": [[r.pid, r.start, comm] for r, comm in self.procs]}

    @classmethod
    def from_json(cls, data: Any) -> KernelRecord:
        """Inverse of :meth:`to_json`; ``ValueError`` for anything we did not write."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a kernel record of this version")
        try:
            procs = tuple((_proc(p[:2]), _text(p[2])) for p in data.get("procs") or [])
            return cls(id=_text(data["id"]), kernel=_text(data["kernel"]), image=_text(data["image"]),
                       launcher=_proc(data["launcher"]), session=data["session"] is True,
                       parent=_ref(data.get("parent")), created=float(data["created"]),
                       watcher=_ref(data.get("watcher")), procs=procs)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"damaged kernel record: {exc}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _ref(value: Any) -> ProcRef | None:
    return None if value is None else _proc(value)


def _proc(value: Any) -> ProcRef:
    pid, start = value
    if not (isinstance(pid, int) and isinstance(start, int) and pid > 0 and start >= 0):
        raise TypeError(f"{value!r} is not a process")
    return ProcRef(pid, start)


def records_path() -> str:
    """Where this host's exec-kernel records live."""
    return os.path.join(paths.host_state_path(), "kernels")


def write_record(record: KernelRecord, path: str) -> None:
    """Write ``record`` atomically (a file beside it, then a rename; no tempfile import on the launch path)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record.to_json(), fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(path: str) -> KernelRecord | None:
    """The record at ``path``; None when it is gone. ``ValueError`` when it is damaged."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    return KernelRecord.from_json(data)


# ----------------------------------------------------------------------------- the launcher's side


def arm(spec: LaunchSpec, env: Mapping[str, str], binary: str) -> tuple[dict[str, str], list[str]]:
    """Record this launcher's kernel and start its watcher; the runtime environment with the kernel's
    marker added, and warnings (the kernel still starts when it cannot be watched).

    Called by the launcher right before it ``exec``s ``binary``: on the hot path, so stdlib only, no
    subprocess, one fork.
    """
    from hpc_kernels.runtimes.apptainer import env_prefix

    me = procfs.proc_ref(os.getpid())
    if me is None:  # pragma: no cover - no /proc
        return dict(env), ["no /proc: this kernel's processes cannot be watched"]
    kid = os.urandom(8).hex()
    record = KernelRecord(id=kid, kernel=spec.kernel, image=spec.image, launcher=me,
                          session=os.getsid(0) == me.pid, parent=procfs.jupyter_parent(), created=time.time())
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


# ----------------------------------------------------------------------------- finding what is left


def leftovers(record: KernelRecord, late: bool = False) -> list[ProcInfo]:
    """Our processes that belong to the kernel of ``record``, once its launcher has ended.

    Found by what was really started, never by a name: (1) the descendants recorded while the launcher
    ran (pid and start time: exact); (2) processes carrying the kernel's marker variable (the kernel and
    everything it started, daemonised or not); (3) when the launcher led its own session, the rest of that
    session (Apptainer's ``squashfuse_ll``, in a process group of its own): see
    :func:`procfs.session_leftovers` (``late``: gc, long after, keeps only Apptainer's helpers there).
    """
    found: dict[int, ProcInfo] = {}
    for ref, _comm in record.procs:
        now = procfs.info(ref.pid)
        if now is not None and now.ref == ref and not now.zombie:
            found[ref.pid] = now
    for pid in procfs.marked(ENV_KERNEL, record.id):
        now = procfs.info(pid)
        if now is not None and not now.zombie:
            found[pid] = now
    if record.session:
        for now in procfs.session_leftovers(record.launcher, helpers_only=late):
            found[now.pid] = now
    found.pop(os.getpid(), None)
    return sorted(found.values(), key=lambda p: p.pid)


def clean(record: KernelRecord, late: bool = False) -> list[ProcInfo]:
    """SIGKILL what is left of the kernel of ``record`` (twice, :data:`SETTLE` apart); what was killed."""
    killed: dict[int, ProcInfo] = {}
    for attempt in range(2):
        left = leftovers(record, late)
        done = set(procfs.kill(p.ref for p in left))
        killed.update((p.pid, p) for p in left if p.pid in done)
        if attempt == 0:
            time.sleep(SETTLE)
    return sorted(killed.values(), key=lambda p: p.pid)


# ----------------------------------------------------------------------------- the watcher


class _Waiter:
    """Waits for processes to exit: pidfds in one ``poll``, or polling /proc where there are none."""

    def __init__(self, refs: Sequence[ProcRef]) -> None:
        import select

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
    import signal

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
    _unlink(path)
    return 0


def spawn(path: str) -> None:
    """Start the watcher of the record at ``path`` (detached: see selfexec.spawn_detached)."""
    os.makedirs(paths.log_path(), mode=0o700, exist_ok=True)
    selfexec.spawn_detached(selfexec.module_argv("hpc_kernels.watcher", "watch", path),
                            os.path.join(paths.log_path(), "watcher.log"))


# ----------------------------------------------------------------------------- gc


def record_paths() -> list[str]:
    """The records on this host, oldest name first."""
    directory = records_path()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def sweep(dry_run: bool = False) -> list[Finding]:
    """``hpc-kernels gc``: what exec-mode kernels left when their watcher could not clean up (it was
    killed too): leftover processes are killed, records removed; a live kernel whose watcher is gone
    gets a new one."""
    from hpc_kernels.gc import Finding

    found: list[Finding] = []
    for path in record_paths():
        try:
            record = read_record(path)
        except (OSError, ValueError) as exc:
            found.append(Finding("kernels", path, "removed", f"a damaged record ({exc})"))
            if not dry_run:
                _unlink(path)
            continue
        if record is None or (record.watcher is not None and record.watcher.alive()):
            continue
        if record.watcher is None and time.time() - record.created < START_GRACE:
            continue  # its watcher is starting
        if record.launcher.alive():
            found.append(Finding("kernels", f"{record.kernel} (pid {record.launcher.pid})",
                                 "restarted its watcher", "its watcher is gone: nothing would clean up after it"))
            if not dry_run:
                spawn(path)
            continue
        left = leftovers(record, late=True)
        for p in left:
            found.append(Finding("kernels", f"pid {p.pid}", "killed",
                                 f"{p.comm} left by kernel '{record.kernel}', whose launcher and watcher are gone"))
        found.append(Finding("kernels", f"{record.kernel} ({record.id})", "removed its record",
                             "its launcher and watcher are gone"))
        if not dry_run:
            procfs.kill(p.ref for p in left)
            _unlink(path)
    return found


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpc_kernels.watcher watch RECORD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "watch":
        print("usage: python -m hpc_kernels.watcher watch RECORD", file=sys.stderr)
        return 2
    import signal

    # The kernel's signals are not ours: a Ctrl-C or hang-up must not stop the cleanup.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return watch(args[1])


if __name__ == "__main__":
    raise SystemExit(main())
