"""The launcher of a job kernel (what the kernelspec runs, on the login node, with jupyter_client's
connection file): it listens on the client's five ports, reattaches to its session's job or submits one
(or runs the agent as a step of an allocation the user holds), starts the watcher, connects to the agent
and relays the five channels. See :mod:`hpc_kernels.runtimes.job` for the whole life of a job kernel.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hpc_kernels import paths, selfexec
from hpc_kernels.adapters.slurm import JOB_HINTS, Slurm
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.fsutil import open_private
from hpc_kernels.model import JobRequest, LaunchSpec
from hpc_kernels.proc import spawn, tail
from hpc_kernels.procfs import start_of
from hpc_kernels.runtimes.job.agent import __file__ as agent_file
from hpc_kernels.runtimes.job.control import Control, read_json, write_json_private
from hpc_kernels.runtimes.job.script import _record_job, sbatch_plan
from hpc_kernels.runtimes.job.session import (
    FINAL_STATES,
    POLL_INTERVAL,
    SESSION_FORMAT,
    _logs_dir,
    _start_of,
    launcher_alive,
    read_connection,
    say,
    session_id,
    session_path,
    sessions_dir,
)
from hpc_kernels.runtimes.job.watcher import cancel_session
from hpc_kernels.runtimes.job.wire import CHANNELS, DEAD_AFTER, PING_INTERVAL, Loop, Relay, proof

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

        argv = ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet",
                sys.executable, "-I", "-S", os.path.abspath(agent_file), str(self.session_file)]
        log = paths.private(_logs_dir()) / f"kernel-{job_id}-step-{self.sid[:8]}.out"

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
        fd = open_private(paths.private(paths.log_dir()) / "job-kernels.log")
        try:
            watcher = spawn(selfexec.module_argv("hpc_kernels.runtimes.job.watcher", "watch", str(self.session_file),
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


def launch(spec: LaunchSpec, connection_file: str) -> int:
    """The launcher's entry for a job kernel (from :func:`hpc_kernels.launch.launch`)."""
    return Launcher(spec, connection_file).run()
