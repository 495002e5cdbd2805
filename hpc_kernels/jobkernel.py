"""Job kernels: a kernel in a Slurm allocation of its own, started from any Jupyter (docs/job-kernels.md).

The launcher (what the kernelspec runs, on the login node, with jupyter_client's connection file):

1. listens on the client's five ports (127.0.0.1, as the connection file says) at once;
2. finds this kernel's *session* (``<state>/kernel-jobs/<sid>.json``, private; ``sid`` is derived from the
   kernel name and the connection key, which jupyter_client keeps across restarts) and reattaches to its
   job, or submits a new job running the agent (:mod:`hpc_kernels.jobagent`), or, with
   ``$HPC_KERNELS_JOB_ID``, runs the agent as a step of an allocation the user already holds;
3. starts a *watcher* in its own session (outside jupyter_client's process group), then tells the Jupyter
   server's log what happens (queued, the job id, Slurm's estimated start, the node);
4. connects to the agent (its address comes through the private session directory), proves it holds the
   key, asks for a kernel, and relays the five channels' bytes to the ports the agent reports.

No exit path leaves an allocation running: the kernel's end ends the launcher; a restart is a new launcher
attaching to the same job within :data:`GRACE` s; the watcher cancels the job when the launcher dies and no
successor comes (the connection file gone = a final shutdown: at once); the agent ends the job by itself
when no launcher is attached for a minute (the watcher died too); ``hpc-kernels gc`` cancels jobs whose
launcher and watcher are both gone. A job that ended (time limit, scancel) is never resubmitted by an
automatic restart: the session remembers it and the launcher says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import paths
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.jobwire import (
    CHANNELS,
    DEAD_AFTER,
    PING_INTERVAL,
    Control,
    Loop,
    Relay,
    proof,
    read_json,
    write_json_private,
)
from hpc_kernels.model import JobRequest, LaunchSpec

#: After its launcher died, the watcher waits this long for a successor (a restart) before cancelling.
GRACE = 30.0
#: Names of our kernel jobs: ``hpck-kernel-<kernel>-<sid[:8]>``.
JOB_PREFIX = "hpck-kernel-"
#: How often the launcher asks Slurm about a job it waits for.
POLL_INTERVAL = 3.0
#: The time-limit warning: sbatch --signal=B:USR1@60 (the agent passes it on).
WARN_BEFORE = 60
SESSION_FORMAT = 1
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def say(kernel: str, text: str) -> None:
    """A line for the Jupyter server's log (the launcher's stderr)."""
    print(f"hpc-kernels: kernel '{kernel}': {text}", file=sys.stderr, flush=True)


def sessions_dir() -> Path:
    """Private records of job kernels: ``<state dir>/kernel-jobs``."""
    return paths.state_dir() / "kernel-jobs"


def session_id(kernel: str, key: str) -> str:
    """One kernel session (the same across restarts: jupyter_client keeps the key) as 16 hex digits."""
    return hashlib.sha256(f"hpc-kernels job kernel\0{kernel}\0{key}".encode()).hexdigest()[:16]


def job_name(kernel: str, sid: str) -> str:
    """The Slurm job name of a session: ``squeue`` shows the kernel, ``gc`` finds the session."""
    return f"{JOB_PREFIX}{kernel}-{sid[:8]}"


@dataclass(frozen=True)
class Connection:
    """What we use of jupyter_client's connection file."""

    ip: str
    ports: dict[str, int]
    key: str
    signature_scheme: str
    #: Everything else of the file (kernel_name, jupyter_session, CurveZMQ keys…): the node's copy gets it too.
    extra: dict[str, Any]


def read_connection(path: str) -> Connection:
    """The client's connection file; an HpcKernelsError says what a job kernel cannot work with."""
    data = read_json(path)
    if data is None:
        raise HpcKernelsError(f"cannot read the connection file {path}.")
    if data.get("transport", "tcp") != "tcp":
        raise HpcKernelsError("a job kernel needs the tcp transport (the connection file asks for "
                              f"{data.get('transport')!r}).")
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise HpcKernelsError("a job kernel needs a signed connection (the connection file has no key): the "
                              "key proves to the job's agent that this launcher may use it.")
    ports = {}
    for name in CHANNELS:
        port = data.get(f"{name}_port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise HpcKernelsError(f"the connection file {path} has no valid {name}_port.")
        ports[name] = port
    own = {"ip", "key", "transport", "signature_scheme", *(f"{name}_port" for name in CHANNELS)}
    return Connection(str(data.get("ip") or "127.0.0.1"), ports, key,
                      str(data.get("signature_scheme") or "hmac-sha256"),
                      {k: v for k, v in data.items() if k not in own})


# ----------------------------------------------------------------------------- sessions


def session_path(sid: str) -> Path:
    """The session record (the agent's file and the node's connection file sit beside it)."""
    return sessions_dir() / f"{sid}.json"


def load_sessions() -> list[dict[str, Any]]:
    """Every session record of ours (files we did not write are ignored)."""
    found = []
    directory = sessions_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if path.name.count(".") != 1:  # <sid>.agent.json, <sid>.node.json
            continue
        data = read_json(str(path))
        if data and data.get("generator") == "hpc-kernels" and data.get("sid") == path.stem:
            found.append(data)
    return found


def remove_session(sid: str) -> None:
    """Forget a session: its record, the agent's file and the node's connection file."""
    for suffix in (".json", ".agent.json", ".node.json"):
        with contextlib.suppress(OSError):
            (sessions_dir() / f"{sid}{suffix}").unlink()


def launcher_alive(session: dict[str, Any], pid_key: str = "launcher_pid") -> bool:
    """Whether the process recorded under ``pid_key`` still runs on this host (same pid, same start)."""
    from hpc_kernels.procfs import alive, start_of

    if session.get("host") != paths.hostname():
        return True  # another login node's: not ours to judge
    try:
        pid = int(session.get(pid_key) or 0)
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not alive(pid):
        return False
    recorded = str(session.get(pid_key.replace("_pid", "_start")) or "")
    return not recorded or recorded == start_of(pid)


# ----------------------------------------------------------------------------- the job script


def sbatch_plan(spec: LaunchSpec, sid: str, session_file: Path) -> tuple[str, list[str]]:
    """The batch script of a kernel's job and sbatch's arguments (``extra_args``)."""
    import shlex

    from hpc_kernels import __version__, slurm, templates
    from hpc_kernels.jobagent import __file__ as agent_file

    job = spec.job or JobRequest()
    lines = []
    for name, value in (("account", job.account), ("partition", job.partition),
                        ("gpus-per-node", job.gpus if job.gpus and job.gpus.rsplit(":", 1)[-1] != "0" else None)):
        if value:
            lines.append(f"#SBATCH --{name}={slurm._directive_value(name, value, 'give a plain name')}")
    command = [sys.executable, "-I", "-S", os.path.abspath(agent_file), str(session_file)]
    script = templates.render(
        "kernel.sbatch.tmpl",
        version=__version__,
        kernel=spec.kernel,
        job_name=job_name(spec.kernel, sid),
        time=slurm._directive_value("time", job.time, "give a Slurm time"),
        mem=slurm._directive_value("mem", job.mem, "give a size like 4G"),
        cpus=str(job.cpus),
        output=slurm._output("kernel-%j.out"),
        warn=str(WARN_BEFORE),
        directives=templates.Block("".join(line + "\n" for line in lines)),
        command=" ".join(shlex.quote(a) for a in command),
    )
    return script, list(job.extra_args)


def test_only(spec: LaunchSpec) -> str:
    """``sbatch --test-only`` of this kernel's job: Slurm's answer (where and when it would start), or an
    HpcKernelsError with the rejection as one sentence (no account, unknown partition, over a limit)."""
    from hpc_kernels.adapters.slurm import JOB_HINTS, SlurmError, rejection_sentence
    from hpc_kernels.proc import run

    script, args = sbatch_plan(spec, "0" * 16, sessions_dir() / "doctor.json")
    result = run(["sbatch", "--test-only", *args], check=False, input_text=script, timeout=60)
    said = (result.stderr + result.stdout).strip()
    if result.returncode != 0:
        raise SlurmError(rejection_sentence(said, JOB_HINTS))
    return said.removeprefix("sbatch: ")


# ----------------------------------------------------------------------------- the launcher


class Launcher:
    """One job kernel's launcher: a session, a job (new or reattached), an agent connection, a relay."""

    def __init__(self, spec: LaunchSpec, connection_file: str) -> None:
        self.spec = spec
        self.connection_file = os.path.abspath(connection_file)
        self.conn = read_connection(connection_file)
        self.sid = session_id(spec.kernel, self.conn.key)
        self.session_file = session_path(self.sid)
        self.agent_file = str(self.session_file)[: -len(".json")] + ".agent.json"
        self.loop = Loop()
        try:
            self.relay = Relay(self.loop, self.conn.ip, self.conn.ports)
        except OSError as exc:
            raise HpcKernelsError(f"cannot listen on the connection file's ports on {self.conn.ip} "
                                  f"({exc.strerror or exc}); another process may hold one: restart the kernel."
                                  ) from None
        self.session: dict[str, Any] = {}
        self.job_id = ""
        self.control: Control | None = None
        self.connecting_since = 0.0
        self.exit_code = 1
        self.last_status: tuple[str, str, str] = ("", "", "")
        self.started = time.monotonic()
        self.ready = False
        self.ending = ""
        self.node = ""
        self.lost = False
        self.step: Any = None  # srun's Popen, in an allocation the user holds
        self.step_log: Path | None = None

    # ------------------------------------------------------------------ session and job

    def _write_session(self, **changes: Any) -> None:
        self.session.update(changes)
        write_json_private(str(self.session_file), self.session)

    def _claim_or_submit(self) -> None:
        from hpc_kernels.procfs import start_of

        paths.private(sessions_dir())
        me = {"host": paths.hostname(), "launcher_pid": os.getpid(), "launcher_start": start_of(os.getpid()),
              "connection_file": self.connection_file}
        old = read_json(str(self.session_file))
        if old and old.get("generator") == "hpc-kernels":
            if old.get("state") == "ended":
                raise HpcKernelsError(
                    f"its Slurm job {old.get('job_id') or '?'} {old.get('ended') or 'ended'}; hpc-kernels does not "
                    "submit a new job on a restart of the same kernel (an automatic restart would queue allocation "
                    "after allocation): start a new kernel (in JupyterLab: Kernel > Change Kernel…, or shut this "
                    "one down and open the notebook again).")
            if int(old.get("launcher_pid") or 0) != os.getpid() and launcher_alive(old):
                raise HpcKernelsError(f"another launcher (pid {old.get('launcher_pid')}) runs this kernel's job "
                                      f"{old.get('job_id')}; shut that kernel down first.")
            self.session = old
            self.job_id = str(old.get("job_id") or "")
            self._write_session(**me)
            self._spawn_watcher()
            if self.job_id:
                say(self.spec.kernel, f"restarting in its Slurm job {self.job_id} (the same allocation).")
                return
        else:
            self.session = {"generator": "hpc-kernels", "format": SESSION_FORMAT, "sid": self.sid,
                            "kernel": self.spec.kernel, "key": self.conn.key,
                            "signature_scheme": self.conn.signature_scheme, "connection_extra": self.conn.extra,
                            "spec": self.spec.to_json(),
                            "job_id": "", "reused": False, "state": "submitting", "ended": "",
                            "created_at": time.time(), **me}
            self._write_session()
            # The watcher first: a launcher killed while sbatch runs still has someone to cancel the job.
            self._spawn_watcher()
        reuse = os.environ.get("HPC_KERNELS_JOB_ID", "").strip()
        if reuse:
            self._run_in_allocation(reuse)
        else:
            self._submit()

    def _submit(self) -> None:
        from hpc_kernels.adapters.slurm import JOB_HINTS, Slurm

        script, args = sbatch_plan(self.spec, self.sid, self.session_file)
        paths.private(_logs_dir())
        job_id = Slurm().submit(script, args, JOB_HINTS)
        self.job_id = job_id
        self._write_session(job_id=job_id, state="queued", submitted_at=time.time())
        _record_job(job_id, self.spec.kernel, script, args)
        summary = (self.spec.job or JobRequest()).summary()
        say(self.spec.kernel, f"submitted Slurm job {job_id} ({summary}); waiting for it to start "
                              f"(log: {_logs_dir() / f'kernel-{job_id}.out'}).")

    def _run_in_allocation(self, job_id: str) -> None:
        """``$HPC_KERNELS_JOB_ID``: the agent runs as a step of an allocation the user holds (never cancelled)."""
        if not job_id.isdigit():
            raise HpcKernelsError(f"HPC_KERNELS_JOB_ID must be a Slurm job id (digits), not {job_id!r}.")
        from hpc_kernels.jobagent import __file__ as agent_file
        from hpc_kernels.proc import spawn

        argv = ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet",
                sys.executable, "-I", "-S", os.path.abspath(agent_file), str(self.session_file)]
        log = paths.private(_logs_dir()) / f"kernel-{job_id}-step-{self.sid[:8]}.out"
        from hpc_kernels.fsutil import open_private

        fd = open_private(log)
        try:
            # Its own session: jupyter_client's SIGINT to our process group must not reach srun.
            step = spawn(argv, env=os.environ, new_session=True, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        self.job_id = job_id
        self.step = step
        self.step_log = log
        self._write_session(job_id=job_id, reused=True, state="queued", srun_pid=step.pid,
                            srun_start=_start_of(step.pid), submitted_at=time.time())
        say(self.spec.kernel, f"starting in your allocation {job_id} (HPC_KERNELS_JOB_ID) as a job step "
                              f"(log: {log}).")

    def _spawn_watcher(self) -> None:
        from hpc_kernels import selfexec
        from hpc_kernels.fsutil import open_private
        from hpc_kernels.proc import spawn

        fd = open_private(paths.private(paths.log_dir()) / "job-kernels.log")
        try:
            watcher = spawn(selfexec.module_argv("hpc_kernels.jobkernel", "watch", str(self.session_file),
                                                 str(os.getpid())),
                            env=os.environ, new_session=True, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        self._write_session(watcher_pid=watcher.pid, watcher_start=_start_of(watcher.pid))

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Claim or submit, then serve until the kernel ends or we are told to stop; the exit code."""
        self._claim_or_submit()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, lambda _s, _f: None)  # handled through the wakeup fd
        self.loop.watch(read_fd, selectors.EVENT_READ, lambda _m: self._signals(read_fd))
        self._watch_parent()
        self.loop.every(0.5, self._tick)
        self.loop.every(PING_INTERVAL, self._ping)
        self.loop.every(POLL_INTERVAL, self._poll_job)
        self._poll_job()
        try:
            self.loop.run()
        finally:
            self.relay.close()
            if self.control is not None:
                self.control.close()
        return self.exit_code

    def _watch_parent(self) -> None:
        """The Jupyter server's death ends us (as ipykernel's parent poller ends a local kernel)."""
        parent = os.getppid()
        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            self.loop.every(1.0, lambda: self._stop("the Jupyter server is gone") if os.getppid() != parent else None)
            return
        self.loop.watch(fd, selectors.EVENT_READ, lambda _m: self._stop("the Jupyter server is gone"))

    def _signals(self, fd: int) -> None:
        for byte in os.read(fd, 64):
            if byte == signal.SIGINT:
                if self.control is not None and self.ready:
                    self.control.send({"op": "interrupt"})
            else:
                self._stop(f"stopped by {signal.Signals(byte).name}")

    def _stop(self, why: str) -> None:
        """Leave: the agent stops our kernel and keeps the job for a successor (the watcher decides)."""
        if self.control is not None:
            self.control.send({"op": "stop"})
            self.control.flush()
        self.ending = why
        self.exit_code = 0
        self.loop.stop()

    def _ping(self) -> None:
        """The agent's dead man's switch is our silence: say something every few seconds."""
        if self.control is not None:
            self.control.send({"op": "ping"})

    def _tick(self) -> None:
        if self.control is not None and self.control.silent_for() > DEAD_AFTER:
            self.control.close()  # the agent (or its node) went silent: _lost says what became of the job
            return
        if self.control is None and self.step is not None and self.step.poll() is not None:
            from hpc_kernels.proc import tail

            said = ""
            if self.step_log is not None:
                with contextlib.suppress(OSError):
                    said = tail(self.step_log.read_text(encoding="utf-8", errors="replace"), 3)
            say(self.spec.kernel, f"srun could not start the kernel's agent in your allocation {self.job_id} "
                                  f"(exit code {self.step.returncode}){': ' + said if said else ''}.")
            self._write_session(state="ended", ended="could not start a step in it")
            self.exit_code = 1
            self.loop.stop()
            return
        if self.control is None and self.job_id:
            agent = read_json(self.agent_file)
            if agent and str(agent.get("job_id")) == self.job_id:
                self._connect(agent)

    def _poll_job(self) -> None:
        """Progress for the server's log while the job waits; the job's end if it never ran our agent."""
        if self.ready or not self.job_id:
            return
        from hpc_kernels.adapters.slurm import Slurm

        details = Slurm().details(self.job_id)
        if details is None:
            return
        status = (details.state, details.reason, details.start)
        if details.state in FINAL_STATES and self.control is None:
            self._job_ended(details.state, details.reason, details.time_limit)
            return
        if status != self.last_status:
            self.last_status = status
            if details.state == "PENDING":
                when = f"; Slurm's estimated start: {details.start.replace('T', ' ')}" if details.start else ""
                why = f" ({details.reason})" if details.reason else ""
                say(self.spec.kernel, f"Slurm job {self.job_id} is queued{why}{when}.")
            elif details.state == "RUNNING" and details.node:
                self.node = details.node
                say(self.spec.kernel, f"Slurm job {self.job_id} runs on {details.node}; starting the kernel there.")

    # ------------------------------------------------------------------ the agent

    def _connect(self, agent: dict[str, Any]) -> None:
        address = (str(agent.get("address")), int(agent.get("port") or 0))
        try:
            sock = socket.create_connection(address, timeout=5.0)
        except OSError:
            return  # not listening yet, or a stale file of an agent that is gone: try again
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.control = Control(self.loop, sock, self._message, self._lost)
        self.node = str(agent.get("node") or self.node)

    def _message(self, message: dict[str, Any]) -> None:
        assert self.control is not None
        if "hello" in message:
            self.control.send({"proof": proof(self.conn.key.encode(), str(message["hello"]))})
        event = message.get("event")
        if event == "attached":
            self._write_session(state="running")
            self.control.send({"op": "start"})
        elif event == "ready":
            addr = str(message.get("address"))
            ports = message.get("ports") or {}
            self.relay.point_at({name: (addr, int(ports[name])) for name in CHANNELS})
            self.ready = True
            say(self.spec.kernel, f"ready in Slurm job {self.job_id} on {self.node or addr} ({addr}) after "
                                  f"{time.monotonic() - self.started:.1f} s; relaying {self.conn.ip} → {addr}.")
        elif event == "warning":
            say(self.spec.kernel, f"warning: {message.get('message')}")
        elif event == "failed":
            say(self.spec.kernel, f"could not start in Slurm job {self.job_id}: {message.get('message')}.")
            self.exit_code = 1
            self.loop.stop()
        elif event == "exited":
            code = int(message.get("code") or 0)
            self.exit_code = code
            if code and self._job_is_ending():
                # Slurm signals every process of the job at its end (the time limit, scancel): the kernel
                # may die of it before the agent says so. Then it is the job's end, not the kernel's.
                self._lost()
                return
            if code:
                say(self.spec.kernel, f"the kernel exited with code {code} (its output is in "
                                      f"{_logs_dir() / f'kernel-{self.job_id}.out'}).")
            self.loop.stop()
        elif event == "ending":
            self.ending = "the job is ending"

    def _job_is_ending(self) -> bool:
        """Whether Slurm is ending the job (or has): not RUNNING any more."""
        from hpc_kernels.adapters.slurm import Slurm

        details = Slurm().details(self.job_id)
        return details is None or details.state != "RUNNING" or self.ending != ""

    def _lost(self) -> None:
        """The agent's connection ended without the kernel's exit: the job ended (or the node failed)."""
        if self.loop.stopped or self.lost:
            return
        self.lost = True
        control, self.control = self.control, None
        self.ready = False
        if control is not None:
            control.close()  # on_close is this method again: it returns at once (self.lost)
        from hpc_kernels.adapters.slurm import Slurm

        deadline = time.monotonic() + 15.0
        details = Slurm().details(self.job_id)
        while (details is None or details.state not in FINAL_STATES) and time.monotonic() < deadline:
            time.sleep(0.5)
            details = Slurm().details(self.job_id)
        if details is not None and details.state not in FINAL_STATES:
            # The job runs but its agent is gone (killed, crashed): nothing can use the allocation any more.
            cancel_session(self.session, "its agent stopped answering")
            self._write_session(state="ended", ended="lost its agent (the job was cancelled)")
            say(self.spec.kernel, f"the agent in Slurm job {self.job_id} stopped answering; the job was cancelled "
                                  f"(its output: {_logs_dir() / f'kernel-{self.job_id}.out'}). Start a new kernel "
                                  "for a new allocation.")
            self.exit_code = 1
            self.loop.stop()
            return
        state = details.state if details else "UNKNOWN"
        self._job_ended(state, details.reason if details else "", details.time_limit if details else "")

    def _job_ended(self, state: str, reason: str, limit: str) -> None:
        if state == "TIMEOUT" or "TimeLimit" in reason:
            what = f"reached its time limit{f' ({limit})' if limit else ''}"
        elif state == "CANCELLED":
            what = "was cancelled (scancel, or by the cluster)"
        elif state in ("COMPLETED", "UNKNOWN", "RUNNING", "COMPLETING"):
            what = "ended"
        else:
            what = f"ended ({state}{f': {reason}' if reason else ''})"
        self._write_session(state="ended", ended=what)
        say(self.spec.kernel, f"its Slurm job {self.job_id} {what}; the kernel has stopped. Start a new kernel "
                              "for a new allocation (hpc-kernels does not resubmit on a restart).")
        self.exit_code = 1
        self.loop.stop()


def _logs_dir() -> Path:
    return paths.log_dir() / "slurm"


def _start_of(pid: int) -> str:
    from hpc_kernels.procfs import start_of

    return start_of(pid)


def _record_job(job_id: str, kernel: str, script: str, args: list[str]) -> None:
    """A record in ``<state>/jobs`` so that ``hpc-kernels jobs`` lists kernel jobs beside build jobs."""
    from hpc_kernels import slurm
    from hpc_kernels.fsutil import atomic_write

    record = {
        "generator": "hpc-kernels", "format": slurm.RECORD_FORMAT, "job_id": job_id, "kind": "kernel",
        "kernels": [kernel], "array": False, "registry": "", "depends_on": None, "submitted_at": time.time(),
        "host": paths.hostname(), "script": "", "sbatch_args": args,
        "tasks": [{"task_id": job_id, "kernel": kernel, "log": str(_logs_dir() / f"kernel-{job_id}.out")}],
    }
    atomic_write(slurm.jobs_dir() / f"{job_id}.json", json.dumps(record, indent=1) + "\n", private=True)


def launch(spec: LaunchSpec, connection_file: str) -> int:
    """The launcher's entry for a job kernel (from :func:`hpc_kernels.launch.launch`)."""
    return Launcher(spec, connection_file).run()


# ----------------------------------------------------------------------------- the watcher


def cancel_session(session: dict[str, Any], why: str) -> None:
    """End a session's job (or, in an allocation the user holds, only our step and srun)."""
    from hpc_kernels.adapters.slurm import Slurm

    job = str(session.get("job_id") or "")
    if session.get("reused"):
        agent = read_json(str(sessions_dir() / f"{session['sid']}.agent.json")) or {}
        step = str(agent.get("step_id") or "")
        if job and step.isdigit():
            Slurm().cancel([f"{job}.{step}"])
        if launcher_alive(session, "srun_pid"):
            with contextlib.suppress(OSError):
                os.kill(int(session["srun_pid"]), signal.SIGKILL)
    elif job:
        Slurm().cancel([job])
    else:  # the launcher died during sbatch: find the job by its name
        name = job_name(str(session.get("kernel")), str(session.get("sid")))
        Slurm().cancel([j for j, n in Slurm().named(JOB_PREFIX).items() if n == name])
    print(f"hpc-kernels watcher: cancelled job {job or '(by name)'} of kernel '{session.get('kernel')}': {why}",
          file=sys.stderr, flush=True)


def watch(session_file: str, launcher: int) -> None:
    """Wait for the launcher to end; then, unless a successor (a restart) claims the session within
    :data:`GRACE` s, end the job. A connection file that is gone means a final shutdown: end it at once."""
    from hpc_kernels.containers import wait_for_parent

    wait_for_parent(launcher)
    deadline = time.monotonic() + GRACE
    while True:
        session = read_json(session_file)
        if session is None:
            return
        if int(session.get("launcher_pid") or 0) != launcher and launcher_alive(session):
            return  # a successor took over; its own watcher looks after it from now on
        final = not os.path.exists(str(session.get("connection_file")))
        if session.get("state") == "ended":
            # Its job is over. The record refuses automatic restarts (which would resubmit) until the kernel
            # is shut down for good; after GRACE s it is left for 'hpc-kernels gc'.
            if final:
                remove_session(str(session["sid"]))
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)
            continue
        if final or time.monotonic() >= deadline:
            cancel_session(session, "the kernel was shut down" if final else
                           f"its launcher is gone and no restart came within {GRACE:g} s")
            if final and session.get("job_id") and not session.get("reused"):
                _write_exit(str(session["job_id"]))
            remove_session(str(session["sid"]))
            return
        time.sleep(0.2)


def _write_exit(job_id: str) -> None:
    """A kernel shut down on purpose ended well: ``hpc-kernels jobs`` says COMPLETED, not CANCELLED."""
    from hpc_kernels import slurm
    from hpc_kernels.fsutil import atomic_write

    with contextlib.suppress(OSError):
        atomic_write(slurm.jobs_dir() / f"{job_id}.exit", "0\n", private=True)


# ----------------------------------------------------------------------------- gc


def sweep(dry_run: bool = False) -> list[Any]:
    """``hpc-kernels gc``: cancel kernel jobs whose launcher and watcher are both gone (this host's), forget
    sessions whose job is over, and name kernel jobs with no record here (left alone: maybe another
    state directory's)."""
    from hpc_kernels import gc
    from hpc_kernels.adapters.slurm import Slurm

    if not sessions_dir().is_dir():
        return []
    client = Slurm()
    if not client.available():
        return []
    found = []
    live = client.named(JOB_PREFIX)
    claimed = set()
    for session in load_sessions():
        sid, job = str(session["sid"]), str(session.get("job_id") or "")
        claimed.add(job_name(str(session.get("kernel")), sid))
        if session.get("host") != paths.hostname() or launcher_alive(session):
            continue
        if launcher_alive(session, "watcher_pid") and session.get("state") != "ended":
            continue  # its watcher is deciding (a restart may come)
        running = job in live if not session.get("reused") else launcher_alive(session, "srun_pid")
        if running:
            found.append(gc.Finding("kernel-jobs", f"job {job} ({session.get('kernel')})",
                                    "would cancel" if dry_run else "cancelled",
                                    "its launcher and watcher are gone"))
            if not dry_run:
                cancel_session(session, "hpc-kernels gc: its launcher and watcher are gone")
        if not dry_run:
            remove_session(sid)
    for job, name in sorted(live.items()):
        if name not in claimed:
            found.append(gc.Finding("kernel-jobs", f"job {job} ({name})", "left alone",
                                    f"no record of it in {sessions_dir()}; 'scancel {job}' if nothing uses it"))
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_kernels.jobkernel watch SESSION_FILE LAUNCHER_PID`` (the watcher)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "watch" or not args[2].isdigit():
        print("usage: python -m hpc_kernels.jobkernel watch SESSION_FILE LAUNCHER_PID", file=sys.stderr)
        return 2
    try:
        watch(args[1], int(args[2]))
    except (HpcKernelsError, OSError) as exc:
        print(f"hpc-kernels watcher: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # jupyter_client's signals are for the kernel, not for us: the cleanup must run whatever happens.
    for _sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(_sig, signal.SIG_IGN)
    raise SystemExit(main())
