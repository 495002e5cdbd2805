"""The job agent: what a job kernel's Slurm job runs on the compute node
(``python -I -S .../hpc_kernels/runtimes/job/agent.py SESSION_FILE``).

It listens on one port of the node's address for its launcher (on the login node), which proves it
holds the kernel's connection key; for each launcher that attaches it starts the container kernel under
the kernel's rules (``apptainer exec --cleanenv``, binds, ``--nv``/``--rocm`` for *this* node,
``-W $SLURM_TMPDIR``) with a connection file of its own (same key, ports of this node, bound to the
node's address only), and tells the launcher the ports to relay to. A restart is a new launcher
attaching to the same agent: a new kernel in the same allocation.

Dead man's switch: with no launcher attached for :data:`GRACE` seconds (none ever came, or the last
one went silent), the agent stops its kernel and exits, which ends the job: an allocation is never
left running because the login node side died. SIGTERM (``scancel``, the time limit) and SIGUSR1
(``--signal``: the time limit is near) are reported to the launcher before the agent ends.
"""

from __future__ import annotations

import os
import sys

if not __package__:
    # Run as a script (the job script does): put the directory holding hpc_kernels first, as launch.py does.
    # (hpc_kernels/runtimes/job/agent.py: four levels up.)
    _here = os.path.abspath(__file__)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(_here)))))

import contextlib
import secrets
import selectors
import signal
import socket
import time

import hpc_kernels.runtimes.apptainer.cli as apptainer
from hpc_kernels import procfs
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.launchspec import from_json
from hpc_kernels.proc import spawn
from hpc_kernels.runtimes.job.control import Control, read_json, write_json_private
from hpc_kernels.runtimes.job.node import free_ports, listening, log, node_address
from hpc_kernels.runtimes.job.wire import CHANNELS, DEAD_AFTER, PING_INTERVAL, PROTOCOL, Loop, proof_ok

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Sequence
    from typing import Any

    from hpc_kernels.model import LaunchSpec

#: How long the agent waits for a launcher (at start, and after one went away) before ending the job.
GRACE = 60.0
#: How long a kernel may take to listen on its five ports (mounting a large image on a busy node).
START_TIMEOUT = 180.0
#: SIGTERM to the kernel's process group, then SIGKILL after this long.
KILL_AFTER = 5.0


class Agent:
    """One job's agent: the control listener, at most one launcher and one kernel at a time."""

    def __init__(self, session_file: str) -> None:
        session = read_json(session_file)
        if session is None:
            raise ValueError(f"cannot read the kernel session {session_file}")
        self.session_file = session_file
        self.agent_file = session_file[: -len(".json")] + ".agent.json"
        self.node_file = session_file[: -len(".json")] + ".node.json"
        self.key = str(session["key"]).encode()
        self.scheme = str(session.get("signature_scheme", "hmac-sha256"))
        extra = session.get("connection_extra")
        self.extra: dict[str, Any] = extra if isinstance(extra, dict) else {}
        self.spec: LaunchSpec = from_json(session["spec"])
        self.loop = Loop()
        self.address = node_address(dict(os.environ))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((self.address, 0))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.launcher: Control | None = None
        self.unproven: dict[Control, str] = {}
        self.kernel: subprocess.Popen[bytes] | None = None
        self.kernel_ref: procfs.ProcRef | None = None
        self.kernel_ports: dict[str, int] = {}
        self.kernel_ready = False
        self.kernel_started = 0.0
        self.kill_timer = 0
        self.alone_since = time.monotonic()
        self.ending = ""
        self.kernels_started = 0

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Serve launchers until the dead man's switch, a signal or a ``quit`` ends the agent."""
        port = self.listener.getsockname()[1]
        write_json_private(self.agent_file, {
            "protocol": PROTOCOL, "address": self.address, "port": port, "pid": os.getpid(),
            "job_id": os.environ.get("SLURM_JOB_ID", ""), "step_id": os.environ.get("SLURM_STEP_ID", ""),
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "started_at": time.time(),
        })
        log(f"listening on {self.address}:{port} for the launcher of kernel '{self.spec.kernel}'")
        self.loop.watch(self.listener, selectors.EVENT_READ, lambda _m: self._accept())
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(signum, lambda _s, _f: None)  # handled through the wakeup fd
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.loop.watch(read_fd, selectors.EVENT_READ, lambda _m: self._signals(read_fd))
        if EARLY:  # the launcher hears of them once it is attached (it usually is within a second)
            early = bytes(EARLY)
            EARLY.clear()

            def replay() -> None:
                os.write(write_fd, early)

            self.loop.call_later(2.0, replay)
        self.loop.every(0.25, self._tick)
        self.loop.every(PING_INTERVAL, self._ping)
        try:
            self.loop.run()
        finally:
            self._stop_kernel(wait=True)
            for path in (self.agent_file, self.node_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.listener.close()
        log(f"ending ({self.ending or 'done'})")
        return 0

    def _signals(self, fd: int) -> None:
        for byte in os.read(fd, 64):
            if byte == signal.SIGUSR1:
                self._tell({"event": "warning", "message": "Slurm signals that the job's time limit is near: "
                                                           "the kernel stops in about a minute; save your work."})
            elif byte in (signal.SIGTERM, signal.SIGHUP):
                self.ending = "signal"
                self._tell({"event": "ending", "why": "signal"})
                if self.launcher is not None:
                    self.launcher.flush()
                self.loop.stop()

    def _tick(self) -> None:
        """Every 0.25 s: the kernel's state, the launcher's liveness, the dead man's switch."""
        now = time.monotonic()
        if self.kernel is not None:
            code = self.kernel.poll()
            if code is not None:
                self._kernel_exited(code)
            elif not self.kernel_ready:
                self._check_ready()
        if self.launcher is not None and self.launcher.silent_for() > DEAD_AFTER:
            log("the launcher went silent; dropping it")
            self.launcher.close()
        for control in list(self.unproven):
            if control.silent_for() > 10.0:
                control.close()
        if self.launcher is None and now - self.alone_since > GRACE:
            self.ending = f"no launcher for {GRACE:g} s"
            self.loop.stop()

    def _ping(self) -> None:
        self._tell({"event": "ping"})

    def _tell(self, message: dict[str, Any]) -> None:
        if self.launcher is not None:
            self.launcher.send(message)

    # ------------------------------------------------------------------ launchers

    def _accept(self) -> None:
        try:
            conn, _addr = self.listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = secrets.token_hex(16)
        holder: list[Control] = []
        control = Control(self.loop, conn, lambda m: self._message(holder[0], m),
                          lambda: self._closed(holder[0]))
        holder.append(control)
        self.unproven[control] = nonce
        control.send({"hello": nonce, "protocol": PROTOCOL})

    def _message(self, control: Control, message: dict[str, Any]) -> None:
        if control in self.unproven:
            nonce = self.unproven.pop(control)
            if not proof_ok(self.key, nonce, message.get("proof")):
                log("refused a connection that does not hold the kernel's key")
                control.close()
                return
            if self.launcher is not None:  # a successor (restart): the old launcher's kernel goes
                old, self.launcher = self.launcher, None
                old.close()
            self.launcher = control
            control.send({"event": "attached", "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                          "address": self.address, "job_id": os.environ.get("SLURM_JOB_ID", "")})
            return
        if control is not self.launcher:
            return
        op = message.get("op")
        if op == "start":
            self._start_kernel()
        elif op == "interrupt" and self.kernel is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.kernel.pid, signal.SIGINT)
        elif op == "stop":
            self._stop_kernel()
        elif op == "quit":
            self.ending = "asked to end"
            self.loop.stop()

    def _closed(self, control: Control) -> None:
        self.unproven.pop(control, None)
        if control is self.launcher:
            self.launcher = None
            self.alone_since = time.monotonic()
            # The kernel belongs to its launcher: a restart brings a new launcher and a new kernel.
            self._stop_kernel()

    # ------------------------------------------------------------------ the kernel

    def _start_kernel(self) -> None:
        self._stop_kernel(wait=True)
        try:
            if not os.path.exists(self.spec.image):
                raise HpcKernelsError(f"the image {self.spec.image} does not exist on node "
                                      f"{socket.gethostname()}; build it with 'hpc-kernels build {self.spec.kernel}'")
            ports = dict(zip(CHANNELS, free_ports(self.address, len(CHANNELS))))
            # The client's own fields (kernel_name, CurveZMQ keys…) as they are: the relay carries bytes only,
            # so what the client and the kernel agree on stays between them.
            connection: dict[str, Any] = dict(self.extra)
            connection.update({f"{name}_port": port for name, port in ports.items()})
            connection.update({"ip": self.address, "key": self.key.decode(), "transport": "tcp",
                               "signature_scheme": self.scheme})
            connection.setdefault("kernel_name", self.spec.kernel)
            write_json_private(self.node_file, connection)
            binary = apptainer.find_binary(fallback=self.spec.runtime_hint)
            argv, env, warnings = apptainer.exec_command(self.spec, self.node_file, binary, os.environ)
        except (HpcKernelsError, OSError, ValueError) as exc:
            self._tell({"event": "failed", "message": str(exc)})
            return
        for warning in warnings:
            self._tell({"event": "warning", "message": warning})

        self.kernels_started += 1
        log(f"starting kernel #{self.kernels_started}: {' '.join(argv)}")
        self.kernel = spawn(argv, env=env, new_session=True)
        self.kernel_ref = procfs.proc_ref(self.kernel.pid)
        self.kernel_ports = ports
        self.kernel_ready = False
        self.kernel_started = time.monotonic()

    def _check_ready(self) -> None:
        if all(listening(self.address, port) for port in self.kernel_ports.values()):
            self.kernel_ready = True
            log("kernel listening")
            self._tell({"event": "ready", "address": self.address, "ports": self.kernel_ports})
        elif time.monotonic() - self.kernel_started > START_TIMEOUT:
            self._tell({"event": "failed", "message": f"the kernel did not listen on its ports within "
                                                      f"{START_TIMEOUT:g} s (see the job's output file)"})
            self._stop_kernel()

    def _kernel_exited(self, code: int) -> None:
        log(f"kernel exited with code {code}")
        self.kernel = None
        self.kernel_ready = False
        if self.kill_timer:
            self.loop.cancel(self.kill_timer)
            self.kill_timer = 0
        with contextlib.suppress(OSError):
            os.unlink(self.node_file)
        self._tell({"event": "exited", "code": code})
        if self.launcher is not None:
            self.launcher.flush()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """What the kernel's session still holds once its leader (Apptainer) ended: Apptainer puts
        ``squashfuse_ll`` in a process group of its own, which a group kill misses (the exec kernels'
        watcher does the same on a login node, hpc_kernels.runtimes.apptainer.watcher)."""
        ref, self.kernel_ref = self.kernel_ref, None
        if ref is None:
            return
        deadline = time.monotonic() + 2.0  # a clean exit unmounts and ends them by itself: let it
        while procfs.session_leftovers(ref) and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = procfs.kill(p.ref for p in procfs.session_leftovers(ref))
        if killed:
            log(f"killed what the kernel left: {killed}")

    def _stop_kernel(self, wait: bool = False) -> None:
        """SIGTERM the kernel's process group now, SIGKILL it after :data:`KILL_AFTER` s."""
        kernel = self.kernel
        if kernel is None or kernel.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(kernel.pid, signal.SIGTERM)

        def kill() -> None:
            with contextlib.suppress(OSError):
                os.killpg(kernel.pid, signal.SIGKILL)

        if wait:
            deadline = time.monotonic() + KILL_AFTER
            while kernel.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            kill()
            kernel.wait()
            self._kernel_exited(kernel.returncode)
        elif not self.kill_timer:
            self.kill_timer = self.loop.call_later(KILL_AFTER, kill)


#: Signals that came before the agent's loop could take them (a job whose time limit is within the warning's
#: minute gets SIGUSR1 at once): kept, and handled when the loop starts.
EARLY: list[int] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the job: ``agent.py SESSION_FILE``."""
    # First of all: SIGUSR1's default action ends the process, and Slurm may send it right away.
    signal.signal(signal.SIGUSR1, lambda signum, _frame: EARLY.append(signum))
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: agent.py SESSION_FILE", file=sys.stderr)
        return 2
    try:
        agent = Agent(args[0])
    except (OSError, ValueError, KeyError) as exc:
        log(f"cannot start: {exc}")
        return 1
    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
