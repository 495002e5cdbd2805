"""Podman: our per-kernel kernelspec vs the seed's ``docker run`` kernel.json (run by podman's
docker-compatible CLI), our shared container (``mode: instance``) warm, and the PSS of 8 kernels
per-kernel vs shared. Needs podman, the docker/podman runtime of hpc-kernels and a test image.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    NotAvailable,
    Row,
    base_row,
    interleaved,
    ratio_row,
    run_cli,
)
from benchmarks.kernels import Kernel, kernels_dir, pss_mib, start_to_reply, tree, write_spec

#: The image .ci/podman-setup.sh imports (Debian bookworm, python3 + ipykernel).
IMAGE = os.environ.get("HPCK_TEST_PODMAN_IMAGE", "localhost/hpck-test:bookworm")
SEED_LABEL = "hpc-kernels-benchmark"


def podman_binary() -> str:
    """podman, our docker/podman runtime and the test image, or NotAvailable saying which is missing."""
    found = shutil.which("podman")
    if not found:
        raise NotAvailable("podman not installed on this machine")
    if importlib.util.find_spec("hpc_kernels.runtimes.docker") is None:
        raise NotAvailable("the podman runtime is not on this branch")
    if subprocess.run([found, "image", "exists", IMAGE], capture_output=True, timeout=60).returncode != 0:
        raise NotAvailable(f"podman image {IMAGE} missing (bash .ci/podman-setup.sh)")
    return found


def container_ids(podman: str, *filters: str) -> list[str]:
    """Ids of containers (running or not) matching every ``label=...`` filter."""
    argv = [podman, "ps", "-aq"]
    for f in filters:
        argv += ["--filter", f]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.split()


@contextlib.contextmanager
def our_containers_removed(podman: str, kernels: list[str], tag: str) -> Iterator[None]:
    """On exit, remove every container of our (uniquely named) kernels and the seed's labelled ones."""
    try:
        yield
    finally:
        ids = container_ids(podman, f"label={SEED_LABEL}={tag}")
        for name in kernels:
            ids += container_ids(podman, f"label=hpc-kernels.kernel={name}")
        if ids:
            subprocess.run(
                [podman, "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=120, check=False
            )


def related_pids(podman: str, name: str) -> set[int]:
    """Processes working for kernel ``name`` outside the launchers' trees: conmon, watchers, the
    container's own processes (the container id in their cgroup or command line, or the kernel name)."""
    ids = container_ids(podman, f"label=hpc-kernels.kernel={name}")
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            cgroup = Path(f"/proc/{entry}/cgroup").read_text()
        except OSError:
            continue
        if name in cmdline or any(cid in cgroup or cid in cmdline for cid in ids):
            found.add(int(entry))
    return found


def podman_pss(podman: str, name: str, n: int) -> tuple[float, str]:
    """Start ``n`` kernels of ``name`` together and sum the PSS of everything that serves them."""
    ks = [Kernel(name) for _ in range(n)]
    try:
        for k in ks:
            k.start()
        for k in ks:
            k.wait_reply(timeout=180)
        time.sleep(1.0)
        pids = tree([p for p in (k.pid() for k in ks) if p] + sorted(related_pids(podman, name)))
        total, by_name = pss_mib(pids)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]))
        return total, f"{len(pids)} processes: {parts} MiB"
    finally:
        for k in ks:
            k.stop()


def bench_podman(cfg: Config) -> list[Row]:
    """(5) start: ours per-kernel vs the seed, shared warm; (4) PSS per-kernel vs shared container."""
    podman = podman_binary()
    tag = f"hpckbench{os.getpid()}"
    # Neither name contains the other: processes are told apart by the name in their command line.
    per_kernel, shared, seed = f"{tag}-perkernel", f"{tag}-shared", "bench-seed-podman"
    cmd = json.dumps(KERNEL_COMMAND)
    registry = cfg.work / "kernels-podman.yaml"
    registry.write_text(
        "kernels:\n"
        f"  {per_kernel}:\n    runtime: podman\n    image: {IMAGE}\n    command: {cmd}\n"
        # A short idle timeout: the shared container goes away by itself soon after the run.
        f"  {shared}:\n    runtime: podman\n    mode: instance\n    idle_timeout: 10\n    image: {IMAGE}\n"
        f"    command: {cmd}\n",
        encoding="utf-8",
    )
    run_cli(["install", "--registry", str(registry), per_kernel, shared], dict(os.environ))
    # The tutorial's kernel.json with podman for docker (its CLI is docker-compatible) and python3;
    # the label only lets us remove what a killed `run` client would leave behind.
    write_spec(
        seed,
        [
            podman,
            "run",
            "--network=host",
            "--rm",
            "--label",
            f"{SEED_LABEL}={tag}",
            "-v",
            "{connection_file}:/connection_file",
            IMAGE,
            "python3",
            "-m",
            "ipykernel_launcher",
            "-f",
            "/connection_file",
        ],
        "seed (docker run, by podman)",
    )
    assert (kernels_dir() / seed / "kernel.json").is_file()
    bench = "podman: start→kernel_info"
    n = 2 if cfg.quick else 8
    mem = f"podman: PSS of {n} kernels"
    with our_containers_removed(podman, [per_kernel, shared], tag):
        start_to_reply(shared)  # warm the shared container
        res = interleaved(
            {
                "ours": lambda: start_to_reply(per_kernel),
                "seed": lambda: start_to_reply(seed),
                "shared": lambda: start_to_reply(shared),
            },
            cfg.reps,
            cfg.warmup,
        )
        per_mib, per_procs = podman_pss(podman, per_kernel, n)
        sh_mib, sh_procs = podman_pss(podman, shared, n)
    return [
        base_row(bench, "seed kernel.json (docker run, by podman)", res["seed"]),
        ratio_row(bench, "ours, podman per-kernel container", res["ours"], "seed", res["seed"]),
        ratio_row(
            bench, "ours, podman shared container (warm)", res["shared"], "ours per-kernel", res["ours"]
        ),
        Row(mem, "ours, podman per-kernel containers", per_mib, "MiB", 1, per_procs, 1.0, "(baseline)"),
        Row(
            mem,
            "ours, podman shared container",
            sh_mib,
            "MiB",
            1,
            sh_procs,
            sh_mib / per_mib if per_mib else None,
            "per-kernel",
        ),
    ]
