"""Kernel start → kernel_info reply, and shutdown → container gone, for Docker/Podman kernels.

    python benchmarks/docker_podman_start.py [-n 5]

Needs what ``.ci/podman-setup.sh`` prepares (podman, localhost/hpck-test:bookworm, the API socket for
the docker CLI). Runs in a throw-away HOME; prints one line per kernel kind (median and all runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

IMAGE = "localhost/hpck-test:bookworm"
SOCKET = "unix:///run/podman/podman.sock"
KINDS = {  # name: (runtime, mode)
    "podman-run": ("podman", "exec"),
    "docker-run": ("docker", "exec"),
    "podman-shared": ("podman", "instance"),
}


def leftovers(name: str) -> bool:
    out = subprocess.run(["podman", "ps", "-aq", "--filter", f"label=hpc-kernels.kernel={name}",
                          "--filter", "label=hpc-kernels.role=kernel"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="runs per kernel kind")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hpck-bench-"))
    os.environ.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), JUPYTER_DATA_DIR=str(home / "jd"),
                      DOCKER_HOST=SOCKET, PYDEVD_DISABLE_FILE_VALIDATION="1")
    lines = ["kernels:"]
    for name, (runtime, mode) in KINDS.items():
        lines += [f"  {name}:", f"    runtime: {runtime}", f"    mode: {mode}", f"    image: {IMAGE}",
                  "    idle_timeout: 2",
                  '    command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]']
    (home / "kernels.yaml").write_text("\n".join(lines) + "\n")

    from jupyter_client.manager import KernelManager

    from hpc_kernels import kernelspec, registry

    reg = registry.load(home / "kernels.yaml")
    for name in KINDS:
        kernelspec.install(reg.get(name), kernelspec.Target())
        starts, stops = [], []
        for i in range(args.n):
            km = KernelManager(kernel_name=name, connection_file=str(home / f"{name}-{i}.json"))
            t0 = time.perf_counter()
            km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            starts.append(time.perf_counter() - t0)
            kc.stop_channels()
            t0 = time.perf_counter()
            km.shutdown_kernel(now=False)
            while leftovers(name):
                time.sleep(0.05)
            stops.append(time.perf_counter() - t0)
        kill = ""
        if KINDS[name][1] == "exec":  # SIGKILL of the launcher's process group → container removed
            km = KernelManager(kernel_name=name, connection_file=str(home / f"{name}-kill.json"))
            km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            km.client().wait_for_ready(timeout=120)
            t0 = time.perf_counter()
            os.killpg(km.provisioner.process.pid, signal.SIGKILL)
            while leftovers(name):
                time.sleep(0.05)
            kill = f"; SIGKILL→no container {time.perf_counter() - t0:.2f} s"
            km.shutdown_kernel(now=True)
        print(f"{name:14s} start→kernel_info median {statistics.median(starts):.2f} s "
              f"{[round(s, 2) for s in starts]}; "
              f"shutdown→clean median {statistics.median(stops):.2f} s{kill}")
    time.sleep(3)  # let the shared container idle out
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
