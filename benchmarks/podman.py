"""Podman: our per-kernel kernelspec vs the seed's ``docker run`` kernel.json (run by podman's
docker-compatible CLI), our shared container (``mode: instance``) warm, our ``runtime: docker`` kernelspec
(the docker CLI talking to podman's API service), the PSS of 8 kernels per-kernel vs shared, and cleanup:
shutdown → container gone, SIGKILL of the kernel's process group → container gone (ours) or left running
(the seed's). Needs podman, the docker/podman runtime of hpc-kernels and a test image (and, for the docker
variant, the docker CLI and the API socket ``.ci/podman-setup.sh`` starts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
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
    median,
    na_row,
    ratio_row,
    run_cli,
    spread,
)
from benchmarks.kernels import Kernel, kernels_dir, kernels_pss, start_to_reply, write_spec

#: The image .ci/podman-setup.sh imports (Debian bookworm, python3 + ipykernel).
IMAGE = os.environ.get("HPCK_TEST_PODMAN_IMAGE", "localhost/hpck-test:bookworm")
SEED_LABEL = "hpc-kernels-benchmark"
#: podman's docker-compatible API service, as .ci/podman-setup.sh starts it.
PODMAN_SOCKET = "/run/podman/podman.sock"


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


def docker_cli() -> str:
    """The docker CLI, reaching podman's API service (DOCKER_HOST set here when unset), or NotAvailable."""
    found = shutil.which("docker")
    if not found:
        raise NotAvailable("docker CLI not installed")
    if "DOCKER_HOST" not in os.environ and os.path.exists(PODMAN_SOCKET):
        # The kernels inherit it from this process, as they would from a Jupyter server's environment.
        os.environ["DOCKER_HOST"] = f"unix://{PODMAN_SOCKET}"
    if subprocess.run([found, "version"], capture_output=True, timeout=60).returncode != 0:
        raise NotAvailable("the docker CLI reaches no daemon (bash .ci/podman-setup.sh starts podman's API)")
    return found


def wait_gone(podman: str, filters: list[str], timeout: float = 60.0) -> float | None:
    """Seconds until no container matches ``filters`` (polled every 50 ms), or None after ``timeout``."""
    t0 = time.perf_counter()
    while container_ids(podman, *filters):
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(0.05)
    return time.perf_counter() - t0


def cleanup_times(podman: str, name: str, rounds: int) -> tuple[list[float | None], list[float | None]]:
    """For ``rounds`` kernels each: graceful shutdown → no container of ``name``, and SIGKILL of the
    kernel's process group (what jupyter_client does to a kernel that ignores shutdown) → no container."""
    gone = [f"label=hpc-kernels.kernel={name}", "label=hpc-kernels.role=kernel"]
    shutdowns: list[float | None] = []
    kills: list[float | None] = []
    for _ in range(rounds):
        k = Kernel(name)
        try:
            k.start()
            k.wait_reply(timeout=180)
            k.kc.stop_channels()
            t0 = time.perf_counter()
            k.km.shutdown_kernel(now=False)
            left = wait_gone(podman, gone)
            shutdowns.append(None if left is None else time.perf_counter() - t0)
        finally:
            k.stop()
        k = Kernel(name)
        try:
            k.start()
            k.wait_reply(timeout=180)
            pid = k.pid()
            assert pid is not None
            t0 = time.perf_counter()
            os.killpg(pid, signal.SIGKILL)
            kills.append(wait_gone(podman, gone))
        finally:
            k.stop()
    return shutdowns, kills


def seed_sigkill_leaks(podman: str, seed: str, tag: str, wait: float = 3.0) -> int:
    """Start the seed's kernel, SIGKILL its process group like jupyter_client does, and count its
    containers still running ``wait`` seconds later (removed afterwards by our_containers_removed)."""
    k = Kernel(seed)
    try:
        k.start()
        k.wait_reply(timeout=180)
        pid = k.pid()
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        time.sleep(wait)
        return len(container_ids(podman, f"label={SEED_LABEL}={tag}", "status=running"))
    finally:
        k.stop()


def cleanup_row(variant: str, times: list[float | None]) -> Row:
    """Median seconds until the container is gone; a container still there after 60 s fails the row."""
    done = [t for t in times if t is not None]
    left = len(times) - len(done)
    return Row("podman: cleanup", variant, median(done) if done else None, "s", len(times),
               spread(done) if done else "", target="container removed", ok=left == 0,
               note=f"{left} of {len(times)} containers still there after 60 s" if left else "")


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
    return kernels_pss(name, n, related=lambda: sorted(related_pids(podman, name)))


def bench_podman(cfg: Config) -> list[Row]:
    """(5) start: ours per-kernel vs the seed, shared warm; (4) PSS per-kernel vs shared container."""
    podman = podman_binary()
    tag = f"hpckbench{os.getpid()}"
    # Neither name contains the other: processes are told apart by the name in their command line.
    per_kernel, shared, seed = f"{tag}-perkernel", f"{tag}-shared", "bench-seed-podman"
    docker_kernel = f"{tag}-dockercli"
    try:
        docker_cli()
        # --quick proves the benchmark works: the docker CLI's kernels are tested in tests/real/test_docker.py.
        docker_why = "not run with --quick" if cfg.quick else ""
    except NotAvailable as exc:
        docker_why = str(exc)
    cmd = json.dumps(KERNEL_COMMAND)
    registry = cfg.work / "kernels-podman.yaml"
    registry.write_text(
        "kernels:\n"
        f"  {per_kernel}:\n    runtime: podman\n    image: {IMAGE}\n    command: {cmd}\n"
        # A short idle timeout: the shared container goes away by itself soon after the run.
        f"  {shared}:\n    runtime: podman\n    mode: instance\n    idle_timeout: 10\n    image: {IMAGE}\n"
        f"    command: {cmd}\n"
        f"  {docker_kernel}:\n    runtime: docker\n    image: {IMAGE}\n    command: {cmd}\n",
        encoding="utf-8",
    )
    ours = [per_kernel, shared] + ([] if docker_why else [docker_kernel])
    run_cli(["install", "--registry", str(registry), *ours], dict(os.environ))
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
    variants = {
        "ours": lambda: start_to_reply(per_kernel),
        "seed": lambda: start_to_reply(seed),
        "shared": lambda: start_to_reply(shared),
    }
    if not docker_why:
        variants["docker"] = lambda: start_to_reply(docker_kernel)
    with our_containers_removed(podman, [per_kernel, shared, docker_kernel], tag):
        start_to_reply(shared)  # warm the shared container
        res = interleaved(variants, cfg.reps, cfg.warmup)
        per_mib, per_procs = podman_pss(podman, per_kernel, n)
        sh_mib, sh_procs = podman_pss(podman, shared, n)
        shutdowns, kills = cleanup_times(podman, per_kernel, 1 if cfg.quick else 3)
        leaked = seed_sigkill_leaks(podman, seed, tag, wait=1.0 if cfg.quick else 3.0)
    docker_row = (
        ratio_row(bench, "ours, runtime docker (docker CLI → podman API)", res["docker"], "ours per-kernel",
                  res["ours"])
        if not docker_why else na_row(bench, "ours, runtime docker (docker CLI → podman API)", docker_why)
    )
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
        docker_row,
        cleanup_row("ours per-kernel: shutdown_kernel → container gone", shutdowns),
        cleanup_row("ours per-kernel: SIGKILL of the kernel's process group → container gone", kills),
        Row("podman: cleanup", "seed: SIGKILL of the `podman run` client → containers still running after",
            leaked, "containers", 1, note=f"{1 if cfg.quick else 3} s; removed by the benchmark afterwards"),
    ]
