"""The leak campaign: start → cell → end, over and over, for every mode, rotating how the kernel ends.

    python -m benchmarks.leak_campaign [--cycles N] [--mode exec|instance|podman|docker ...] [--sif SIF]

Ends, rotated:
  shutdown            the client asks the kernel to shut down (what closing a notebook does);
  kill-kernel-pid     SIGKILL of the kernel's PID alone (the OOM killer, ``kill -9 PID``);
  kill-process-group  SIGKILL of the kernel's whole process group (jupyter_client's hard kill);
  client-dies         SIGKILL of the client process that started the kernel, which never shuts it down
                      (a JupyterHub session reaching its time limit, a crashed Jupyter server).
After every cycle, everything tests/helpers/leaks.py tracks (processes, starters, squashfuse, FUSE mounts,
instances, containers, jobs, build temporaries) must be back to what it was before the campaign.
Run it as an unprivileged user (squashfuse, user namespaces, rootless Podman): that is what DRAC users get.
The CI test (tests/real/test_leak_campaign.py) runs one cycle per end and mode; this command runs as many as asked
and prints the counts per mode and end. Exit status 1 when anything was left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

ENDS = ("shutdown", "kill-kernel-pid", "kill-process-group", "client-dies")
MODES = ("exec", "instance", "podman", "docker")
TEST_IMAGE = "localhost/hpck-test:bookworm"
DEFAULT_SIF = os.environ.get("HPCK_TEST_BASE_SIF", "/var/cache/hpc-kernels-ci/base.sif")

# The client: a process of its own that starts the kernel, runs a cell, reports READY and then ends it
# the way it is told. Runs with the caller's environment (HOME, JUPYTER_* pointing at the workspace).
CLIENT = r"""
import os, signal, sys, time
from jupyter_client import KernelManager
name, end, runtime_dir = sys.argv[1:4]
for attempt in range(3):  # jupyter_client's port race: a kernel that dies at start-up is retried
    km = KernelManager(kernel_name=name, connection_file=os.path.join(runtime_dir, f"k-{os.getpid()}-{attempt}.json"))
    # The kernel's output goes to a log, not to our pipe: an orphaned kernel holding the pipe open would
    # block the campaign, and ipykernel's banner would interleave with READY.
    log = open(os.path.join(runtime_dir, f"k-{os.getpid()}-{attempt}.log"), "ab")
    km.start_kernel(stdout=log, stderr=log)
    kc = km.client(); kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        break
    except RuntimeError:
        kc.stop_channels(); km.shutdown_kernel(now=True)
else:
    sys.exit("kernel never became ready")
reply = kc.execute_interactive("print(6 * 7)", timeout=60, output_hook=lambda msg: None)
assert reply["content"]["status"] == "ok", reply
pid = km.provisioner.process.pid
print("READY", pid, flush=True)
if end == "shutdown":
    kc.stop_channels(); km.shutdown_kernel(now=False)
elif end == "kill-kernel-pid":
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    kc.stop_channels(); km.cleanup_resources()
elif end == "kill-process-group":
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    time.sleep(1.0)
    kc.stop_channels(); km.cleanup_resources()
elif end == "client-dies":
    time.sleep(600)  # the campaign SIGKILLs this process now
print("DONE", flush=True)
"""


def registry_text(sif: str) -> str:
    """One kernel per mode, all running the test image's python3 + ipykernel."""
    command = '[python3, -m, ipykernel_launcher, -f, "{connection_file}"]'
    return f"""\
defaults:
  command: {command}
kernels:
  leak-exec:
    image: {sif}
  leak-instance:
    image: {sif}
    mode: instance
    idle_timeout: 1
  leak-podman:
    runtime: podman
    image: {TEST_IMAGE}
  leak-docker:
    runtime: docker
    image: {TEST_IMAGE}
"""


def workspace_env(root: Path) -> dict[str, str]:
    """An environment whose HOME, XDG and Jupyter dirs live under ``root`` (never the real ones)."""
    home = root / "home"
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_STATE_HOME": str(home / ".local/state"), "XDG_CACHE_HOME": str(home / ".cache"),
        "JUPYTER_DATA_DIR": str(home / ".local/share/jupyter"), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / "rt"), "IPYTHONDIR": str(home / ".ipython"),
        "HPC_KERNELS_REGISTRY": str(root / "kernels.yaml"),
    })
    if "DOCKER_HOST" not in env and os.path.exists("/run/docker.sock"):
        env["DOCKER_HOST"] = "unix:///run/docker.sock"
    for var in ("JUPYTER_PATH", "APPTAINER_BIND", "SLURM_TMPDIR"):
        env.pop(var, None)
    (home / "rt").mkdir(parents=True, exist_ok=True)
    return env


def install(root: Path, env: Mapping[str, str], modes: Sequence[str], sif: str) -> None:
    """Write the registry and install the kernels of ``modes`` (through the real CLI)."""
    (root / "kernels.yaml").write_text(registry_text(sif))
    names = [f"leak-{m}" for m in modes]
    subprocess.run([sys.executable, "-m", "hpc_kernels", "install", *names], env=dict(env), check=True,
                   capture_output=True, text=True, timeout=300)


def cycle(mode: str, end: str, env: Mapping[str, str]) -> str:
    """One start → cell → end of the ``mode`` kernel; returns '' or what went wrong with the client."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, f"leak-{mode}", end, env["JUPYTER_RUNTIME_DIR"]],
                            env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        _end_client(proc)
        return f"client failed: {line.strip()} {_stderr(proc)}"
    if end == "client-dies":
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return ""
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        _end_client(proc)
        return f"client did not finish: {_stderr(proc)}"
    return "" if proc.returncode == 0 else f"client exit {proc.returncode}: {_stderr(proc)}"


def _end_client(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the client's session (its own; what it started in other sessions is the campaign's to find)."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _stderr(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    lines = [ln for ln in proc.stderr.read().splitlines() if "Debugger warning" not in ln and "frozen" not in ln]
    return " ".join(lines)[-500:]


def campaign(modes: Sequence[str], cycles: int, root: Path, sif: str, settle: float = 30.0,
             log: object = None) -> dict[tuple[str, str], list[str]]:
    """Run ``cycles`` cycles of each end for each mode; returns, per (mode, end), what each cycle left."""
    from tests.helpers import leaks

    env = workspace_env(root)
    install(root, env, modes, sif)
    homes = (env["HOME"],)
    results: dict[tuple[str, str], list[str]] = {}
    for mode in modes:
        for n in range(cycles):
            for end in ENDS:
                before = leaks.snapshot(homes, env)
                problem = cycle(mode, end, env)
                left = leaks.leftovers(before, homes, settle=settle, environ=env)
                if left:
                    leaks.remove(left, homes, env)
                outcome = problem or "; ".join(map(str, sorted(left)))
                results.setdefault((mode, end), []).append(outcome)
                if callable(log):
                    log(f"{mode:9} {end:19} #{n + 1}: {outcome or 'nothing left'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the campaign and print counts (cycles, cycles that left something) per mode and end."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leak_campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=25, help="cycles per end and mode (default 25: 100 per mode)")
    parser.add_argument("--mode", action="append", choices=MODES, help="modes to run (default: all)")
    parser.add_argument("--sif", default=DEFAULT_SIF, help="a SIF with python3 + ipykernel")
    parser.add_argument("--json", metavar="OUT", help="write the per-cycle results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hpck-leaks-") as tmp:
        t0 = time.monotonic()
        results = campaign(args.mode or MODES, args.cycles, Path(tmp), args.sif,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    counts = Counter({key: sum(1 for r in rs if r) for key, rs in results.items()})
    print(f"leak campaign: {args.cycles} cycle(s) per end, {time.monotonic() - t0:.0f} s, as uid {os.getuid()}")
    print(f"{'mode':10}{'end':20}{'cycles':>7}{'leaked':>8}")
    for (mode, end), rs in results.items():
        print(f"{mode:10}{end:20}{len(rs):>7}{counts[(mode, end)]:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{e}": rs for (m, e), rs in results.items()}, indent=2))
    return 1 if sum(counts.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
