"""The Slurm job runtime: a kernel of any container runtime in a Slurm allocation of its own, started from
any Jupyter (docs/job-kernels.md). The plugin the runtime table names (``table.job()``).

The launcher (what the kernelspec runs, on the login node, with jupyter_client's connection file;
:mod:`.launcher`):

1. listens on the client's five ports (127.0.0.1, as the connection file says) at once;
2. finds this kernel's *session* (:mod:`.session`: ``<state>/kernel-jobs/<sid>.json``, private; ``sid`` is
   derived from the kernel name and the connection key, which jupyter_client keeps across restarts) and
   reattaches to its job, or submits a new job running the agent (:mod:`.agent`, its script :mod:`.script`),
   or, with ``$HPC_KERNELS_JOB_ID``, runs the agent as a step of an allocation the user already holds;
3. starts a *watcher* (:mod:`.watcher`) in its own session (outside jupyter_client's process group), then
   tells the Jupyter server's log what happens (queued, the job id, Slurm's estimated start, the node);
4. connects to the agent (its address comes through the private session directory), proves it holds the
   key, asks for a kernel, and relays the five channels' bytes to the ports the agent reports
   (:mod:`.wire`, :mod:`.control`).

No exit path leaves an allocation running: the kernel's end ends the launcher; a restart is a new launcher
attaching to the same job within ``session.GRACE`` s; the watcher cancels the job when the launcher dies and
no successor comes (the connection file gone = a final shutdown: at once); the agent ends the job by itself
when no launcher is attached for a minute (the watcher died too); ``hpc-kernels gc`` (:mod:`.sweep`) cancels
jobs whose launcher and watcher are both gone. A job that ended (time limit, scancel) is never resubmitted
by an automatic restart: the session remembers it and the launcher says so.
"""

from __future__ import annotations

from collections.abc import Mapping

from hpc_kernels.errors import RuntimeNotFoundError
from hpc_kernels.runtimes.base import Features

TYPE_CHECKING = False  # why: typing is not loaded on the launcher's path (python -S)
if TYPE_CHECKING:
    from hpc_kernels.model import KernelEntry, LaunchSpec
    from hpc_kernels.runtimes.base import Builder, Plan, Runtime


class Job:
    """The :class:`hpc_kernels.runtimes.base.Runtime` of job kernels: it wraps the kernel's own runtime,
    which the agent starts on the node (binary, builds and images are that runtime's)."""

    name = "job"
    features = Features(modes=("exec",))
    sweepers = ("hpc_kernels.runtimes.job.sweep:sweep",)
    doctor_checks = ("slurm-job",)

    def _inner(self, runtime: str) -> Runtime:
        from hpc_kernels.runtimes import table  # why: the table names this module (a lazy, one-way hop)

        return table.get(runtime)

    def find_binary(self, environ: Mapping[str, str] | None = None, fallback: str = "") -> str:
        """``sbatch``: what a job kernel needs on the login node."""
        import shutil  # why: not on the launcher's path

        found = shutil.which("sbatch", path=(environ or {}).get("PATH"))
        if not found:
            raise RuntimeNotFoundError("'sbatch' was not found on PATH: job kernels need Slurm.")
        return found

    def builder(self, binary: str | None = None) -> Builder:
        """Job kernels build with their own runtime's builder (``runtime:`` of the kernel)."""
        raise NotImplementedError("a job kernel's image is built by its own runtime")

    def plan(self, spec: LaunchSpec, connection_file: str, environ: Mapping[str, str]) -> Plan:
        """What the agent runs on the node: the kernel's own runtime's plan."""
        return self._inner(spec.runtime).plan(spec, connection_file, environ)

    def start(self, spec: LaunchSpec, connection_file: str) -> int:
        """The launcher of a job kernel (not a hot path: the job's queueing dominates)."""
        from hpc_kernels.runtimes.job import launcher  # why: imported by job kernels only

        return launcher.launch(spec, connection_file)

    def image_reference(self, entry: KernelEntry) -> str:
        """The kernel's own runtime's image."""
        return self._inner(entry.runtime).image_reference(entry)

    def has_records(self) -> bool:
        """Job kernels' sessions here."""
        from hpc_kernels.runtimes.job import session  # why: gc only

        return session.sessions_dir().is_dir()


RUNTIME = Job()
