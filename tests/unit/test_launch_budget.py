"""The launcher's import budget: what a kernel start imports, under ``python -I -S`` as the kernelspec runs it.

Every module on this path costs every kernel start; the runtime table imports only the runtime (and the mode)
a kernel uses. A module added to a path fails these tests: make it lighter, or raise the budget on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hpc_kernels.kernelspec import launcher_argv
from hpc_kernels.model import LaunchSpec

#: What an Apptainer exec-mode kernel start imports of hpc_kernels (up to the exec of the runtime).
EXEC_BUDGET = frozenset({
    "hpc_kernels", "hpc_kernels.errors", "hpc_kernels.launch", "hpc_kernels.launchspec", "hpc_kernels.model",
    "hpc_kernels.model.words", "hpc_kernels.model.launch",
    "hpc_kernels.paths", "hpc_kernels.procfs", "hpc_kernels.selfexec", "hpc_kernels.runtimes",
    "hpc_kernels.runtimes.table", "hpc_kernels.runtimes.base", "hpc_kernels.runtimes.envpolicy",
    "hpc_kernels.runtimes.gpu", "hpc_kernels.runtimes.apptainer", "hpc_kernels.runtimes.apptainer.cli",
    "hpc_kernels.runtimes.apptainer.execrecord", "hpc_kernels.runtimes.apptainer.watcher",
})
#: Shared Apptainer instances: the exec path's modules (but the watcher's), and the instance's own.
INSTANCE_BUDGET = (EXEC_BUDGET - {"hpc_kernels.runtimes.apptainer.execrecord", "hpc_kernels.runtimes.apptainer.watcher"}) | {
    "hpc_kernels.fsutil", "hpc_kernels.locks", "hpc_kernels.runtimes.apptainer.attach", "hpc_kernels.runtimes.apptainer.instance",
    "hpc_kernels.runtimes.apptainer.records", "hpc_kernels.runtimes.apptainer.reaper",
    "hpc_kernels.runtimes.apptainer.status",
}
#: Docker and Podman kernels (both modes): no Apptainer module at all (their start runs the CLI: proc, and
#: writes per-user state: fsutil).
CONTAINER_BUDGET = frozenset({
    "hpc_kernels", "hpc_kernels.errors", "hpc_kernels.launch", "hpc_kernels.launchspec", "hpc_kernels.model",
    "hpc_kernels.model.words", "hpc_kernels.model.launch",
    "hpc_kernels.proc", "hpc_kernels.fsutil", "hpc_kernels.locks",
    "hpc_kernels.paths", "hpc_kernels.procfs", "hpc_kernels.selfexec", "hpc_kernels.runtimes",
    "hpc_kernels.runtimes.table", "hpc_kernels.runtimes.base", "hpc_kernels.runtimes.envpolicy",
    "hpc_kernels.runtimes.gpu", "hpc_kernels.runtimes.parent", "hpc_kernels.runtimes.docker",
    "hpc_kernels.runtimes.docker.cli", "hpc_kernels.runtimes.docker.container", "hpc_kernels.runtimes.podman",
})
#: Standard-library modules an exec-mode start must not import (each costs milliseconds under ``-S``).
HEAVY = frozenset({"typing", "pathlib", "subprocess", "socket", "tempfile", "shutil", "hashlib", "selectors",
                   "threading", "shlex", "importlib.util"})

#: Run in the launcher's interpreter: the launcher's own ``main`` up to its ``execve`` (replaced by a report of
#: what was imported), the detached watcher not started.
PROBE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
import hpc_kernels.selfexec as selfexec

def report(path, argv, env):
    new = sorted(set(sys.modules) - before)
    print(json.dumps(new), flush=True)
    os._exit(0)

os.execve = report
selfexec.spawn_detached = lambda argv, log: None
import hpc_kernels.launch as launch
sys.exit(launch.main([sys.argv[2], sys.argv[3]]))
"""


def _launcher() -> tuple[list[str], str]:
    python, *flags, script = launcher_argv()
    return [python, *flags], str(Path(script).parent.parent)


def _imported_by_exec_launch(tmp_path: Path) -> list[str]:
    image = tmp_path / "k.sif"
    image.write_bytes(b"")
    runtime = tmp_path / "apptainer"
    runtime.write_text("#!/bin/sh\n")
    runtime.chmod(0o755)
    spec = LaunchSpec(kernel="k", runtime="apptainer", mode="exec", image=str(image),
                      command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"))
    spec_file = tmp_path / "kernel.json"
    spec_file.write_text(json.dumps({"argv": [], "display_name": "k", "language": "python",
                                     "metadata": {"hpc_kernels": spec.to_json()}}))
    interpreter, root = _launcher()
    env = {**os.environ, "HPC_KERNELS_APPTAINER": str(runtime)}
    done = subprocess.run([*interpreter, "-c", PROBE, root, str(spec_file), str(tmp_path / "c.json")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_an_exec_mode_kernel_start_stays_within_its_import_budget(tmp_path: Path) -> None:
    loaded = _imported_by_exec_launch(tmp_path)
    ours = {m for m in loaded if m.split(".")[0] == "hpc_kernels"}
    assert ours <= EXEC_BUDGET, f"new on the launcher's path: {sorted(ours - EXEC_BUDGET)}"
    assert not HEAVY & set(loaded), f"heavy modules on the launcher's path: {sorted(HEAVY & set(loaded))}"


@pytest.mark.parametrize(("runtime", "modules", "budget"), [
    ("apptainer", "hpc_kernels.runtimes.apptainer.attach", INSTANCE_BUDGET),
    ("docker", "hpc_kernels.runtimes.docker.container", CONTAINER_BUDGET),
    ("podman", "hpc_kernels.runtimes.docker.container", CONTAINER_BUDGET),
])
def test_other_modes_import_only_their_runtime(runtime: str, modules: str, budget: frozenset[str]) -> None:
    """What the table's runtime and its launch-side module import (their modules import at the top)."""
    interpreter, root = _launcher()
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); "
            "import hpc_kernels.launch; from hpc_kernels.runtimes import table; "
            f"table.get({runtime!r}); import {modules}; "
            "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.startswith('hpc_kernels'))))")
    done = subprocess.run([*interpreter, "-c", code, root], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ours = set(json.loads(done.stdout))
    assert ours <= budget, f"new on the {runtime} launch path: {sorted(ours - budget)}"
