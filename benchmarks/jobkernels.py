"""Job kernels (docs/job-kernels.md) on the Slurm cluster at hand: reported, never asserted.

- ``start→kernel_info``: a job kernel (sbatch, the job starting on an idle cluster, the agent, the container
  on the compute node, the relay) against an exec kernel of the same image on this host, interleaved.
- ``execute round trip``: an ``execute_request`` → ``execute_reply`` of ``pass``, through the relay (the
  client's ports on 127.0.0.1) against a second client connected straight to the kernel's ports on the node;
  the difference is what the relay adds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    NotAvailable,
    Row,
    base_row,
    interleaved,
    median,
    ratio_row,
    run_cli,
    spread,
)
from benchmarks.kernels import Kernel, start_to_reply

BENCH = "job kernel"
JOB, EXEC = "bench-job", "bench-job-exec"


def _check_cluster() -> None:
    if shutil.which("sbatch") is None:
        raise NotAvailable("no Slurm here (sbatch not on PATH)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        raise NotAvailable("slurmctld does not answer")


def _install(cfg: Config) -> None:
    cmd = json.dumps(KERNEL_COMMAND)
    registry = cfg.work / "kernels-job.yaml"
    registry.write_text(
        "kernels:\n"
        f"  {JOB}:\n    image: {cfg.sif}\n    command: {cmd}\n    job: {{time: 10, mem: 500M}}\n"
        f"  {EXEC}:\n    image: {cfg.sif}\n    command: {cmd}\n",
        encoding="utf-8",
    )
    run_cli(["install", "--registry", str(registry), JOB, EXEC], dict(os.environ))


def _start(name: str) -> float:
    # A start that died (a port taken between jupyter_client's choice and the kernel's bind, on a busy
    # machine) is started again and counted, as for every other kernel benchmark.
    return start_to_reply(name, after=_wait_job_gone if name == JOB else None, timeout=300)


def _wait_job_gone(timeout: float = 60) -> None:
    """The next round starts on an idle cluster: the previous kernel's job has ended."""
    import hpc_kernels.runtimes.job.session as jobkernel

    deadline = time.monotonic() + timeout
    while jobkernel.load_sessions() and time.monotonic() < deadline:
        time.sleep(0.2)


def _round_trips(kc: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = kc.execute("pass", reply=True, timeout=60)
        out.append(time.perf_counter() - t0)
        assert reply["content"]["status"] == "ok"
    return out


def bench_jobkernel(cfg: Config) -> list[Row]:
    """Start latency against an exec kernel, and the relay's added round trip."""
    _check_cluster()
    _install(cfg)
    reps = max(2, cfg.reps // 2)
    times = interleaved({JOB: lambda: _start(JOB), EXEC: lambda: _start(EXEC)}, reps, cfg.warmup)
    rows = [
        base_row(BENCH, "start→kernel_info: exec kernel on this host", times[EXEC]),
        ratio_row(BENCH, "start→kernel_info: job kernel (sbatch, idle cluster)", times[JOB], "exec",
                  times[EXEC], note="includes sbatch and the job's start"),
    ]
    rows += _relay_rows(cfg)
    return rows


def _relay_rows(cfg: Config) -> list[Row]:
    from jupyter_client.blocking.client import BlockingKernelClient

    import hpc_kernels.runtimes.job.session as jobkernel

    k = Kernel(JOB)
    try:
        k.start()
        k.wait_reply(timeout=300)
        (session,) = jobkernel.load_sessions()
        node_file = jobkernel.sessions_dir() / f"{session['sid']}.node.json"
        direct = BlockingKernelClient()
        direct.load_connection_info(json.loads(Path(node_file).read_text()))
        direct.start_channels()
        try:
            direct.wait_for_ready(timeout=60)
            n = 20 if cfg.quick else 200
            _round_trips(k.kc, 5)
            _round_trips(direct, 5)
            relayed, straight = [], []
            for _ in range(5):  # interleaved blocks: the machine's load drifts alike for both
                relayed += _round_trips(k.kc, n // 5)
                straight += _round_trips(direct, n // 5)
        finally:
            direct.stop_channels()
    finally:
        k.stop()
        _wait_job_gone()
    added = (median(relayed) - median(straight)) * 1000
    return [
        Row(BENCH, "execute round trip: straight to the node's ports", median(straight) * 1000, "ms",
            len(straight), spread([x * 1000 for x in straight]), 1.0, "(baseline)"),
        Row(BENCH, "execute round trip: through the relay (what the notebook uses)", median(relayed) * 1000,
            "ms", len(relayed), spread([x * 1000 for x in relayed]),
            median(relayed) / median(straight), "straight", note=f"relay adds {added:.2f} ms (median)"),
    ]
