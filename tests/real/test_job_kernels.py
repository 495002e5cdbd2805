"""Job kernels on the real test bed: the Jupyter side (jupyter_client) on the login node, the kernel in its own
Slurm job on the compute node (network namespace ``hkc``, no route beyond the login node), in the kernel's
Apptainer container. Every exit path ends with "no job, no process, no mount, no relay left": each test
waits (bounded) for its job to be gone, and the ``no_leftovers`` fixture checks processes, mounts and jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels.runtimes.job import session as job_session
from tests.helpers.kernels import run_cell

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer, pytest.mark.timeout(420)]

KERNEL = "jk"
REGISTRY = """\
kernels:
  jk:
    image: {image}
    command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
    job: {job}
"""


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, apptainer_bin: str) -> Iterator[None]:
    """A Slurm controller that answers, apptainer on PATH; cancels this test's kernel jobs after."""
    import shutil

    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (bash .ci/lmod-slurm-setup.sh installs and starts it)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        pytest.skip(f"slurmctld does not answer (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()})")
    monkeypatch.setenv("PATH", f"{Path(apptainer_bin).parent}{os.pathsep}{os.environ['PATH']}")
    yield
    ids = [str(s.get("job_id")) for s in job_session.load_sessions() if s.get("job_id") and not s.get("reused")]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def install(make_registry: Any, base_sif: Path, job: str) -> Path:
    reg = make_registry(REGISTRY.format(image=base_sif, job=job))
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "install", KERNEL, "--registry", str(reg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return reg


def squeue(job: str) -> str:
    """The job's state while Slurm lists it as live, else ""."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    state = out.stdout.strip()
    return "" if state in ("", "COMPLETED", "CANCELLED", "TIMEOUT", "FAILED") else state


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)


def session() -> dict[str, Any]:
    (only,) = job_session.load_sessions()
    return only


def alive(pid: int) -> bool:
    from hpc_kernels.procfs import alive as live

    return live(pid)


def nothing_left(job: str, pids: list[int], timeout: float = 120.0) -> None:
    """No job, no launcher/watcher process, no session record (mounts and node processes: no_leftovers)."""
    wait_until(f"job {job} to end", lambda: squeue(job) == "", timeout)
    wait_until(f"processes {pids} to end", lambda: not any(alive(p) for p in pids), 30)
    wait_until("the session record to go", lambda: job_session.load_sessions() == [] or
               all(s.get("state") == "ended" for s in job_session.load_sessions()), 30)


def start(km: Any, log: Path, ready: bool = True, timeout: float = 180) -> Any:
    """Start the kernel with the launcher's stderr (the server's log) in ``log``; a ready client."""
    fh = open(log, "ab")  # noqa: SIM115 - open for the manager's life: a restart launches with it again
    km.test_log = fh
    km.start_kernel(stderr=fh)
    kc = km.client()
    kc.start_channels()
    if ready:
        kc.wait_for_ready(timeout=timeout)
    return kc


def launcher_pid(km: Any) -> int:
    return int(km.provisioner.process.pid)


def test_lifecycle_start_execute_interrupt_restart_shutdown(
    cluster: None, base_sif: Path, make_registry: Any, tmp_path: Path,
) -> None:
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    spec = json.loads((Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["display_name"] == "Python (jk) [job: 500M, 10 min]"
    log = tmp_path / "server.log"
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, log)
    try:
        job = str(session()["job_id"])
        # The code runs in the container, on the compute node, in the kernel's own job.
        reply, out = run_cell(kc, "import os, socket; print(os.environ['SLURM_JOB_ID'], socket.gethostname(), "
                                  "os.path.isdir('/.singularity.d')); x = 1")
        assert reply["status"] == "ok"
        assert out.split() == [job, "compute", "True"]
        text = log.read_text()
        assert f"submitted Slurm job {job} (500M, 10 min); waiting for it to start" in text
        assert f"ready in Slurm job {job} on compute (10.250.0.2)" in text
        # The client talks to 127.0.0.1 (its connection file); the kernel listens on the node's address only.
        client = json.loads(Path(km.connection_file).read_text())
        assert client["ip"] == "127.0.0.1"
        node = json.loads((job_session.sessions_dir() / f"{session()['sid']}.node.json").read_text())
        assert node["ip"] == "10.250.0.2" and node["key"] == km.session.key.decode()
        # The client's own fields travel along (the kernel rewrites its copy of the file, so: the record).
        assert session()["connection_extra"]["kernel_name"] == client["kernel_name"] == KERNEL

        # Interrupt during a long cell.
        msg_id = kc.execute("import time; time.sleep(120)")
        time.sleep(2)
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 10

        # Restart: a new kernel in the same allocation.
        first = launcher_pid(km)
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=120)
        assert launcher_pid(km) != first and not alive(first)
        reply, out = run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'], 'x' in globals())")
        assert reply["status"] == "ok" and out.split() == [job, "False"]
        assert f"restarting in its Slurm job {job} (the same allocation)" in log.read_text()
        assert squeue(job) == "RUNNING"
        # A hard restart (jupyter_client SIGKILLs the launcher's process group) stays in the job too.
        second = launcher_pid(km)
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=120)
        assert launcher_pid(km) != second and not alive(second)
        reply, out = run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert reply["status"] == "ok" and out.split() == [job]
        watcher = int(session()["watcher_pid"])
        second = launcher_pid(km)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # Shutdown ends the job (at once: the connection file is gone, so no restart can come).
    t0 = time.monotonic()
    nothing_left(job, [second, watcher], timeout=30)
    assert time.monotonic() - t0 < 20
    assert job_session.load_sessions() == []
    listed = subprocess.run([sys.executable, "-m", "hpc_kernels", "jobs", "--json"], capture_output=True,
                            text=True, timeout=60)
    rows = {r["job_id"]: r for r in json.loads(listed.stdout)}
    assert rows[job]["kind"] == "kernel" and rows[job]["kernel"] == KERNEL
    assert rows[job]["state"] == "COMPLETED"


def test_sigkill_of_the_launcher_ends_the_job(cluster: None, base_sif: Path, make_registry: Any,
                                              tmp_path: Path) -> None:
    """The server stays, the launcher is SIGKILLed and nobody restarts it: the watcher cancels the job."""
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, tmp_path / "server.log")
    job, watcher, launcher = str(session()["job_id"]), int(session()["watcher_pid"]), launcher_pid(km)
    kc.stop_channels()
    os.killpg(launcher, signal.SIGKILL)  # what jupyter_client's hard kill does
    try:
        nothing_left(job, [launcher, watcher], timeout=job_session.GRACE + 60)
        assert job_session.load_sessions() == []
    finally:
        km.cleanup_resources()


def test_death_of_the_jupyter_server_ends_the_job(cluster: None, base_sif: Path, make_registry: Any,
                                                  tmp_path: Path) -> None:
    """The client process (a Jupyter server) is SIGKILLed: its launcher notices, the job ends."""
    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent("""\
        import sys, time
        from jupyter_client.manager import KernelManager
        km = KernelManager(kernel_name="jk")
        km.start_kernel(stderr=open(sys.argv[1], "ab"))
        kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=180)
        print(km.provisioner.process.pid, flush=True)
        time.sleep(600)
        """))
    server = subprocess.Popen([sys.executable, str(script), str(tmp_path / "server.log")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None
        launcher = int(server.stdout.readline())
        job, watcher = str(session()["job_id"]), int(session()["watcher_pid"])
        assert squeue(job) == "RUNNING"
    finally:
        server.kill()
        server.wait()
    wait_until("the launcher to notice its server's death", lambda: not alive(launcher), 10)
    nothing_left(job, [launcher, watcher], timeout=job_session.GRACE + 60)


def test_queued_job_abandoned_by_the_client_is_cancelled(cluster: None, base_sif: Path, make_registry: Any,
                                                         tmp_path: Path) -> None:
    """A job that stays queued (here: it may not start for an hour) while the client gives up."""
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "10", mem: 500M, extra_args: ["--begin=now+3600"]}')
    log = tmp_path / "server.log"
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, log, ready=False)
    try:
        wait_until("the queued message", lambda: "is queued (BeginTime)" in log.read_text(), 30)
        job, watcher, launcher = str(session()["job_id"]), int(session()["watcher_pid"]), launcher_pid(km)
        assert squeue(job) == "PENDING"
        with pytest.raises(RuntimeError):
            kc.wait_for_ready(timeout=3)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)  # the user closes the notebook
    t0 = time.monotonic()
    nothing_left(job, [launcher, watcher], timeout=30)
    assert time.monotonic() - t0 < 15


def test_time_limit_ends_the_kernel_with_a_message_and_is_not_resubmitted(
    cluster: None, base_sif: Path, make_registry: Any, tmp_path: Path,
) -> None:
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "1", mem: 500M}')
    log = tmp_path / "server.log"
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, log)
    job, watcher, launcher = str(session()["job_id"]), int(session()["watcher_pid"]), launcher_pid(km)
    try:
        assert run_cell(kc, "print(1)")[0]["status"] == "ok"
        # Slurm ends the job at its limit (its timer runs every ~30 s): the launcher ends with the reason.
        wait_until("the kernel to end at the time limit", lambda: not km.is_alive(), 200, interval=1)
        text = log.read_text()
        assert f"its Slurm job {job} reached its time limit" in text, text
        assert "the kernel has stopped" in text
        # An automatic restart (same kernel, same key) does not queue a new allocation.
        km.start_kernel(stderr=km.test_log)
        wait_until("the refusing launcher to exit", lambda: not km.is_alive(), 30)
        assert "hpc-kernels does not submit a new job on a restart of the same kernel" in log.read_text()
        assert [s["job_id"] for s in job_session.load_sessions()] == [job]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    nothing_left(job, [launcher, watcher], timeout=30)
    assert job_session.load_sessions() == []  # the connection file is gone: the record went with it


def test_gc_cancels_a_kernel_job_whose_launcher_and_watcher_are_gone(
    cluster: None, base_sif: Path, make_registry: Any, tmp_path: Path,
) -> None:
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, tmp_path / "server.log")
    kc.stop_channels()
    job, watcher, launcher = str(session()["job_id"]), int(session()["watcher_pid"]), launcher_pid(km)
    os.kill(watcher, signal.SIGKILL)
    os.killpg(launcher, signal.SIGKILL)
    try:
        wait_until("launcher and watcher gone", lambda: not alive(launcher) and not alive(watcher), 10)
        dry = subprocess.run([sys.executable, "-m", "hpc_kernels", "gc", "--dry-run"], capture_output=True,
                             text=True, timeout=60)
        assert f"kernel-jobs: job {job} (jk): would cancel (its launcher and watcher are gone)" in \
            " ".join(dry.stderr.split())
        assert squeue(job) == "RUNNING"
        done = subprocess.run([sys.executable, "-m", "hpc_kernels", "gc"], capture_output=True, text=True,
                              timeout=60)
        assert f"kernel-jobs: job {job} (jk): cancelled (its launcher and watcher are gone)" in \
            " ".join(done.stderr.split())
        nothing_left(job, [launcher, watcher], timeout=30)
    finally:
        km.cleanup_resources()


def test_the_agent_ends_the_job_when_launcher_and_watcher_are_both_killed(
    cluster: None, base_sif: Path, make_registry: Any, tmp_path: Path,
) -> None:
    """The dead man's switch: nothing on the login node is left to cancel; the job ends itself."""
    from jupyter_client.manager import KernelManager

    from hpc_kernels.runtimes.job import agent as job_agent

    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, tmp_path / "server.log")
    kc.stop_channels()
    job, watcher, launcher = str(session()["job_id"]), int(session()["watcher_pid"]), launcher_pid(km)
    os.kill(watcher, signal.SIGKILL)
    os.killpg(launcher, signal.SIGKILL)
    try:
        t0 = time.monotonic()
        wait_until(f"job {job} to end by itself", lambda: squeue(job) == "", job_agent.GRACE + 60, interval=1)
        assert time.monotonic() - t0 > job_agent.GRACE - 10  # it waited for a restart first
        out = (Path(os.environ["XDG_STATE_HOME"]) / "hpc-kernels/logs/slurm" / f"kernel-{job}.out").read_text()
        assert f"ending (no launcher for {job_agent.GRACE:g} s)" in out
    finally:
        km.cleanup_resources()
        for s in job_session.load_sessions():
            job_session.remove_session(str(s["sid"]))


def test_doctor_explains_a_job_slurm_would_refuse(cluster: None, base_sif: Path, make_registry: Any) -> None:
    reg = make_registry(REGISTRY.format(image=base_sif, job="{partition: nope, time: 10}"))
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "doctor", KERNEL, "--registry", str(reg)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert ("✗ jk slurm-job: Slurm would refuse the job of kernel 'jk' (4G, 10 min): invalid partition "
            "specified: nope (set job: partition to one that 'sinfo -s' lists, or leave it out).") in done.stdout
    good = make_registry(REGISTRY.format(image=base_sif, job="{time: 10, mem: 500M}"))
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "doctor", KERNEL, "--registry", str(good)],
                          capture_output=True, text=True, timeout=120)
    assert "✓ jk slurm-job: Slurm accepts the job of kernel 'jk' (500M, 10 min): Job " in done.stdout
    assert job_session.load_sessions() == []


def test_a_kernel_in_an_allocation_the_user_holds(cluster: None, base_sif: Path, make_registry: Any,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HPC_KERNELS_JOB_ID: the kernel runs as a step of the user's salloc; shutdown leaves the allocation."""
    from jupyter_client.manager import KernelManager

    held = subprocess.run(["salloc", "--no-shell", "-t", "5", "-c", "1", "--mem", "500M", "-J", "hpck-held"],
                          capture_output=True, text=True, timeout=60)
    alloc = held.stderr.split("Granted job allocation")[-1].split()[0] if "Granted" in held.stderr else ""
    assert alloc.isdigit(), held.stderr
    try:
        install(make_registry, base_sif, '{time: "10", mem: 500M}')
        monkeypatch.setenv("HPC_KERNELS_JOB_ID", alloc)
        log = tmp_path / "server.log"
        km = KernelManager(kernel_name=KERNEL)
        kc = start(km, log)
        try:
            reply, out = run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'], os.environ.get('SLURM_STEP_ID'))")
            assert reply["status"] == "ok" and out.split()[0] == alloc
            assert f"starting in your allocation {alloc} (HPC_KERNELS_JOB_ID) as a job step" in log.read_text()
            watcher, launcher = int(session()["watcher_pid"]), launcher_pid(km)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
        wait_until("launcher and watcher gone", lambda: not alive(launcher) and not alive(watcher), 30)
        wait_until("the step to end", lambda: subprocess.run(["squeue", "-h", "-s", "-j", alloc, "-o", "%i"],
                   capture_output=True, text=True, timeout=30).stdout.strip() in ("", f"{alloc}.extern"), 30)
        assert squeue(alloc) == "RUNNING"  # the user's allocation is theirs: it stays
    finally:
        subprocess.run(["scancel", alloc], capture_output=True, timeout=30)
        wait_until("the allocation to end", lambda: squeue(alloc) == "", 30)


def test_an_allocation_that_is_not_there_is_one_message(cluster: None, base_sif: Path, make_registry: Any,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.manager import KernelManager

    install(make_registry, base_sif, '{time: "10", mem: 500M}')
    monkeypatch.setenv("HPC_KERNELS_JOB_ID", "999999")
    log = tmp_path / "server.log"
    km = KernelManager(kernel_name=KERNEL)
    kc = start(km, log, ready=False)
    try:
        wait_until("the launcher to give up", lambda: not km.is_alive(), 60)
        text = log.read_text()
        assert "srun could not start the kernel's agent in your allocation 999999 (exit code 1)" in text, text
        assert "Traceback" not in text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    wait_until("the session record to go", lambda: job_session.load_sessions() == [], 30)
