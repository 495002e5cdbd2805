"""The Slurm adapter: ``sbatch``, ``squeue``, ``scontrol``, ``sacct`` and ``scancel``, all through proc.run.

It only talks to Slurm and parses its answers; what to submit and what to remember about it lives
in :mod:`hpc_kernels.slurm`.
"""

from __future__ import annotations

import getpass
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError
from hpc_kernels.proc import run

#: Every Slurm query is bounded: a wedged controller must not hang the CLI.
QUERY_TIMEOUT = 30.0

#: States after which a job never runs again (squeue/scontrol/sacct spelling).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "UNKNOWN",
})

NOT_FOUND_HINT = (
    "'sbatch' was not found on PATH: submit from a login node of a Slurm cluster, "
    "or build here without --slurm."
)


class SlurmError(HpcKernelsError):
    """Slurm refused a request (a rejected submission, an unreachable controller)."""


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about one job or array task (``123`` or ``123_4``)."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: str = ""
    source: str = ""  # squeue | scontrol | sacct


@dataclass(frozen=True)
class JobDetails:
    """Where one job stands, for a job kernel's progress messages (``squeue``, else ``scontrol``)."""

    job_id: str
    state: str
    reason: str = ""
    start: str = ""  # the (estimated) start time Slurm gives, "" when it gives none
    node: str = ""
    time_limit: str = ""

    @property
    def final(self) -> bool:
        """It will not run (again)."""
        return self.state.split("|")[0] in FINAL_STATES


class Slurm:
    """The Slurm client programs, as found on PATH."""

    name = "slurm"

    def available(self) -> bool:
        """True when ``sbatch`` is on PATH."""
        return shutil.which("sbatch") is not None

    def submit(self, script: str, args: Sequence[str] = (), hints: Sequence[tuple[re.Pattern[str], str]] = (),
               ) -> str:
        """Submit ``script`` (given on stdin) with ``sbatch --parsable``; returns the job id.

        A rejection (bad time, unknown partition, impossible resources) becomes one sentence, with the fix
        from ``hints`` (default: in terms of ``build --slurm``'s flags).
        """
        if not self.available():
            raise RuntimeNotFoundError(NOT_FOUND_HINT)
        result = run(["sbatch", "--parsable", *args], check=False, input_text=script, timeout=QUERY_TIMEOUT)
        if result.returncode != 0:
            raise SlurmError(rejection_sentence(result.stderr or result.stdout, hints or _HINTS))
        return parse_parsable(result.stdout)

    def queue(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Live jobs (pending, running, completing) among ``job_ids``; array tasks one by one."""
        ids = sorted(set(job_ids))
        if not ids or shutil.which("squeue") is None:
            return {}
        result = run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"],
                     check=False, timeout=QUERY_TIMEOUT)
        # squeue exits 1 ("Invalid job id specified") when none of the ids is known any more.
        return parse_squeue(result.stdout) if result.returncode == 0 else {}

    def control(self, job_id: str) -> dict[str, JobInfo]:
        """``scontrol show job``: also finished jobs, for a few minutes (MinJobAge) after they end."""
        if shutil.which("scontrol") is None:
            return {}
        result = run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=QUERY_TIMEOUT)
        return parse_scontrol(result.stdout) if result.returncode == 0 else {}

    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobInfo] | None:
        """``sacct`` states, or None when the cluster has no accounting (it then exits non-zero)."""
        ids = sorted(set(job_ids))
        if not ids or shutil.which("sacct") is None:
            return None
        result = run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State,ExitCode,Reason"],
                     check=False, timeout=QUERY_TIMEOUT)
        if result.returncode != 0:
            return None
        return parse_sacct(result.stdout)

    def details(self, job_id: str) -> JobDetails | None:
        """State, reason, (estimated) start, node and time limit of one job; None when Slurm forgot it."""
        result = run(["squeue", "-h", "-j", job_id, "-o", "%i|%T|%r|%S|%N|%l"], check=False, timeout=QUERY_TIMEOUT)
        for line in result.stdout.splitlines() if result.returncode == 0 else []:
            parts = line.strip().split("|")
            if len(parts) >= 6 and parts[0] == job_id:
                return JobDetails(job_id, parts[1].upper(), _known(parts[2]), _known(parts[3]),
                                  _known(parts[4]), _known(parts[5]))
        result = run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=QUERY_TIMEOUT)
        fields: dict[str, str] = {}
        for token in result.stdout.split() if result.returncode == 0 else []:
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        if fields.get("JobId") != job_id or "JobState" not in fields:
            return None
        return JobDetails(job_id, fields["JobState"].upper(), _known(fields.get("Reason", "")),
                          _known(fields.get("StartTime", "")), _known(fields.get("NodeList", "")),
                          _known(fields.get("TimeLimit", "")))

    def named(self, prefix: str) -> dict[str, str]:
        """This user's live jobs whose name starts with ``prefix``: job id -> name."""
        if shutil.which("squeue") is None:
            return {}
        result = run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j"], check=False, timeout=QUERY_TIMEOUT)
        found = {}
        for line in result.stdout.splitlines() if result.returncode == 0 else []:
            job, _, name = line.strip().partition("|")
            if job.isdigit() and name.startswith(prefix):
                found[job] = name
        return found

    def cancel(self, job_ids: Iterable[str]) -> None:
        """``scancel`` the given jobs (unknown or finished ones are ignored)."""
        ids = sorted(set(job_ids))
        if ids and shutil.which("scancel") is not None:
            run(["scancel", *ids], check=False, timeout=QUERY_TIMEOUT)


# ----------------------------------------------------------------------------- parsing


def _known(value: str) -> str:
    """Slurm's placeholders for "not known" as ""."""
    return "" if value in ("N/A", "(null)", "None", "Unknown", "n/a") else value



def parse_parsable(stdout: str) -> str:
    """The job id of ``sbatch --parsable`` output (``123`` or ``123;cluster``)."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id (it said: {stdout.strip()[:200]!r}).")
    return job_id


def parse_squeue(stdout: str) -> dict[str, JobInfo]:
    """Lines of ``%i|%T|%r``."""
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            reason = parts[2] if len(parts) > 2 and parts[2] != "None" else ""
            jobs[parts[0]] = JobInfo(parts[0], parts[1].upper(), reason, "", "squeue")
    return jobs


def parse_scontrol(stdout: str) -> dict[str, JobInfo]:
    """``scontrol show job -o`` lines; array tasks are keyed ``<array job>_<task>``."""
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        fields: dict[str, str] = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        if "JobId" not in fields or "JobState" not in fields:
            continue
        task = fields.get("ArrayTaskId", "")
        if task and not task.isdigit():
            continue  # a pending range like 0-2: squeue lists those tasks one by one
        key = f"{fields.get('ArrayJobId', fields['JobId'])}_{task}" if task else fields["JobId"]
        reason = fields.get("Reason", "")
        jobs[key] = JobInfo(key, fields["JobState"].upper(), "" if reason == "None" else reason,
                            fields.get("ExitCode", ""), "scontrol")
    return jobs


def parse_sacct(stdout: str) -> dict[str, JobInfo]:
    """``sacct -n -P -o JobID,State,ExitCode,Reason`` lines (``CANCELLED by 0`` → ``CANCELLED``)."""
    jobs: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0] and parts[1]:
            reason = parts[3] if len(parts) > 3 and parts[3] != "None" else ""
            jobs[parts[0]] = JobInfo(parts[0], parts[1].split()[0].upper(), reason, parts[2], "sacct")
    return jobs


_HINTS = (
    (re.compile(r"time", re.I), "give --time as minutes or [D-]HH:MM:SS, e.g. --time 1:00:00"),
    (re.compile(r"partition", re.I), "list the partitions with 'sinfo -s', or drop --partition"),
    (re.compile(r"account|allocation", re.I), "pass --account def-<pi> or set SBATCH_ACCOUNT"),
    (re.compile(r"processors|memory|node configuration|cpu", re.I),
     "ask for less with --cpus and --mem"),
)


#: The fixes for a job kernel's job, in terms of the registry's ``job:`` keys.
JOB_HINTS = (
    (re.compile(r"processors|memory|node configuration|cpu", re.I),
     "ask for less with the kernel's job: cpus and job: mem"),
    (re.compile(r"gres|gpu", re.I), "job: gpus must be a count or type:count this cluster has "
                                    "(sinfo -o '%P %G' lists them)"),
    (re.compile(r"time", re.I), "job: time is minutes or [D-]HH:MM:SS, within the partition's limit"),
    (re.compile(r"account|association", re.I), "set job: account (or slurm: account) to one of yours, "
                                               "e.g. def-yourpi"),
    (re.compile(r"partition", re.I), "set job: partition to one that 'sinfo -s' lists, or leave it out"),
)


def rejection_sentence(output: str, hints: Sequence[tuple[re.Pattern[str], str]] = _HINTS) -> str:
    """sbatch's complaint as one sentence with the fix we know (first, most specific error line)."""
    messages: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = re.match(r"^sbatch:\s*error:\s*(.*)$", line)
        text = match.group(1) if match else ("" if messages else line)
        text = re.sub(r"^Batch job submission failed:\s*", "", text).strip().rstrip(".")
        if text and text not in messages:
            messages.append(text)
    reason = messages[0] if messages else "no reason given"
    hint = next((h for pattern, h in hints if pattern.search(reason)), "")
    return f"sbatch rejected the job: {reason}" + (f" ({hint})." if hint else ".")
