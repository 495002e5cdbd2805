"""A job kernel's Slurm side: the batch script and ``sbatch`` arguments of its job, ``sbatch --test-only``
(doctor), and the job record ``hpc-kernels jobs`` reads.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from hpc_kernels import __version__, paths, slurm, templates
from hpc_kernels.adapters.slurm import JOB_HINTS, SlurmError, rejection_sentence
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.model import JobRequest, LaunchSpec
from hpc_kernels.proc import run
from hpc_kernels.runtimes.job.agent import __file__ as agent_file
from hpc_kernels.runtimes.job.session import WARN_BEFORE, _logs_dir, job_name, sessions_dir

# ----------------------------------------------------------------------------- the job script


def sbatch_plan(spec: LaunchSpec, sid: str, session_file: Path) -> tuple[str, list[str]]:
    """The batch script of a kernel's job and sbatch's arguments (``extra_args``)."""
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
    script, args = sbatch_plan(spec, "0" * 16, sessions_dir() / "doctor.json")
    result = run(["sbatch", "--test-only", *args], check=False, input_text=script, timeout=60)
    said = (result.stderr + result.stdout).strip()
    if result.returncode != 0:
        raise SlurmError(rejection_sentence(said, JOB_HINTS))
    return said.removeprefix("sbatch: ")


def _record_job(job_id: str, kernel: str, script: str, args: list[str]) -> None:
    """A record in ``<state>/jobs`` so that ``hpc-kernels jobs`` lists kernel jobs beside build jobs."""
    record = {
        "generator": "hpc-kernels", "format": slurm.RECORD_FORMAT, "job_id": job_id, "kind": "kernel",
        "kernels": [kernel], "array": False, "registry": "", "depends_on": None, "submitted_at": time.time(),
        "host": paths.hostname(), "script": "", "sbatch_args": args,
        "tasks": [{"task_id": job_id, "kernel": kernel, "log": str(_logs_dir() / f"kernel-{job_id}.out")}],
    }
    atomic_write(slurm.jobs_dir() / f"{job_id}.json", json.dumps(record, indent=1) + "\n", private=True)
