"""Kernel start latency (start → kernel_info reply) and memory (PSS) with real Apptainer.

Variants, all on the same image and command:
- ``exec``: our kernelspec, installed by ``hpc-kernels install`` (launcher → ``apptainer exec``);
- ``seed``: the tutorial's hand-written kernel.json (``apptainer exec --bind {connection_file}:/tmp/...``);
- ``instance``: our ``mode: instance`` with a warm instance (n/a where the branch lacks instance mode);
- ``host``: a plain host ipykernel (the floor).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty
from typing import Any

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    NotAvailable,
    Row,
    apptainer_binary,
    base_row,
    hpc_kernels_cmd,
    interleaved,
    median,
    na_row,
    ratio_row,
    run_cli,
    spread,
    timed_run,
)

EXEC, SEED, HOST, PASS = "bench-exec", "bench-seed", "bench-host", "bench-pass"
#: Our exec mode's apptainer argv in a hand-written kernel.json: a real kernel without the launcher.
ARGV = "bench-our-argv"
#: A "kernel" that exits at once: isolates the launcher's own cost from the kernel's start.
PASS_COMMAND = ["python3", "-c", "pass", "{connection_file}"]


def instance_mode_available() -> bool:
    """Instance mode is implemented on this branch (``hpc_kernels.runtimes.apptainer.attach`` exists)."""
    return importlib.util.find_spec("hpc_kernels.runtimes.apptainer.attach") is not None


def kernels_dir() -> Path:
    """Where the benchmark's kernelspecs live (the workspace's ``JUPYTER_DATA_DIR``)."""
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels"


def write_spec(name: str, argv: list[str], display: str) -> None:
    """A hand-written kernel.json, as the tutorial (and ipykernel) write them."""
    d = kernels_dir() / name
    d.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": display, "language": "python", "metadata": {"debugger": True}}
    (d / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")


def setup_kernelspecs(cfg: Config, instance_name: str) -> Path:
    """Install ours through ``hpc-kernels install`` and write the seed's and the host's by hand."""
    cmd = json.dumps(KERNEL_COMMAND)
    registry = cfg.work / "kernels-start.yaml"
    registry.write_text(
        "kernels:\n"
        f"  {EXEC}:\n    image: {cfg.sif}\n    command: {cmd}\n"
        # A short idle timeout: should a stop fail, the instance still goes away by itself.
        f"  {instance_name}:\n    image: {cfg.sif}\n    mode: instance\n    idle_timeout: 60\n"
        f"    command: {cmd}\n"
        f"  {PASS}:\n    image: {cfg.sif}\n    command: {json.dumps(PASS_COMMAND)}\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    run_cli(["install", "--registry", str(registry), EXEC, instance_name, PASS], env)
    # The tutorial's kernel.json, verbatim but for the image path and `python3` (the image has no `python`).
    write_spec(
        SEED,
        [
            "apptainer",
            "exec",
            "--bind",
            "{connection_file}:/tmp/connection_file",
            str(cfg.sif),
            "python3",
            "-m",
            "ipykernel_launcher",
            "-f",
            "/tmp/connection_file",
        ],
        "seed (apptainer)",
    )
    write_spec(
        HOST, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "host ipykernel"
    )
    write_our_argv()
    return registry


def write_our_argv() -> None:
    """A kernel.json running what our launcher would ``exec`` for EXEC, minus the launcher: the
    ``apptainer exec`` argv and the container's variables (APPTAINERENV_*) it sets."""
    from hpc_kernels.launch import plan
    from hpc_kernels.launchspec import read_kernel_json

    _data, spec = read_kernel_json(str(kernels_dir() / EXEC / "kernel.json"))
    # jupyter_client substitutes {connection_file} inside arguments too (the bind's src:dst).
    argv, env, _warnings = plan(spec, "{connection_file}")
    write_spec(ARGV, argv, "our apptainer argv, no launcher")
    path = kernels_dir() / ARGV / "kernel.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["env"] = {k: v for k, v in env.items() if k.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


class Kernel:
    """One started kernel (manager + client), shut down on :meth:`stop`."""

    def __init__(self, name: str) -> None:
        from jupyter_client.manager import KernelManager

        # Connection files inside the workspace (a bare KernelManager would put them in /tmp).
        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        runtime.mkdir(parents=True, exist_ok=True)
        self.km = KernelManager(
            kernel_name=name, connection_file=str(runtime / f"kernel-{uuid.uuid4()}.json")
        )
        self.kc: Any = None
        self.msg_id = ""

    def start(self) -> None:
        """Start the kernel and send kernel_info at once (ZMQ queues it until the kernel binds)."""
        # Kernel output (banners, warnings) goes to a log, not over the results.
        with open(Path(os.environ["HOME"]) / "kernels.log", "ab") as log:
            self.km.start_kernel(stdout=log, stderr=log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.msg_id = self.kc.kernel_info()

    def wait_reply(self, timeout: float = 90) -> None:
        """Block until our kernel_info_reply arrives (or the kernel dies / time runs out)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_shell_msg(timeout=0.05)
            except Empty:
                if not self.km.is_alive():
                    raise RuntimeError(f"kernel {self.km.kernel_name} died before replying") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"kernel {self.km.kernel_name}: no kernel_info reply in {timeout:.0f} s"
                    ) from None
                continue
            if msg["msg_type"] == "kernel_info_reply" and msg["parent_header"].get("msg_id") == self.msg_id:
                return

    def pid(self) -> int | None:
        """The pid of the process jupyter_client started (our launcher exec()s into apptainer)."""
        proc = getattr(self.km.provisioner, "process", None)
        return getattr(proc, "pid", None)

    def stop(self) -> None:
        """Graceful shutdown (kill after jupyter_client's wait), then release the sockets."""
        with contextlib.suppress(Exception):
            if self.kc is not None:
                self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=False)
        with contextlib.suppress(Exception):
            self.km.cleanup_resources()


#: Starts that died and were started again, by kernel (reported with the machine line: a run with many
#: retries measured a busy machine).
RETRIES: dict[str, int] = {}


def start_to_reply(name: str, attempts: int = 3, after: Callable[[], None] | None = None,
                   timeout: float = 90) -> float:
    """Seconds from ``start_kernel`` to the kernel_info reply; the shutdown is not timed.

    A kernel that dies at start-up is started again with fresh ports (jupyter_client picks free ports and
    the kernel binds them later: on a busy machine another process can take one in between); only the
    attempt that replied is timed, and each retry is counted in :data:`RETRIES`. ``after`` runs after
    each attempt's shutdown (e.g. waiting until a job kernel's job has gone).
    """
    for attempt in range(attempts):
        k = Kernel(name)
        t0 = time.perf_counter()
        try:
            k.start()
            k.wait_reply(timeout)
            return time.perf_counter() - t0
        except RuntimeError as exc:
            if "died before replying" not in str(exc) or attempt == attempts - 1:
                raise RuntimeError(f"{exc}; the kernels' log ends: {_log_tail()}") from None
            RETRIES[name] = RETRIES.get(name, 0) + 1
        finally:
            k.stop()
            if after is not None:
                after()
    raise AssertionError("unreachable")


def _log_tail(lines: int = 5) -> str:
    """The last lines the kernels wrote (their stderr goes to $HOME/kernels.log), for an error message."""
    try:
        text = (Path(os.environ["HOME"]) / "kernels.log").read_text(encoding="utf-8", errors="replace")
    except (OSError, KeyError):
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty)"


# ----------------------------------------------------------------------------- instances (cleanup)


def instance_names(env: dict[str, str]) -> dict[str, int]:
    """Running Apptainer instances of this user: name → pid."""
    try:
        binary = apptainer_binary(env)
    except NotAvailable:
        return {}
    out = subprocess.run(
        [binary, "instance", "list", "--json"], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    try:
        data = json.loads(out or "{}")
    except ValueError:
        return {}
    return {str(i.get("instance")): int(i.get("pid", 0)) for i in data.get("instances") or []}


@contextlib.contextmanager
def our_instances_stopped(tag: str) -> Iterator[None]:
    """On exit, stop every instance whose name contains ``tag`` (ours) that was not running before."""
    env = dict(os.environ)
    before = set(instance_names(env))
    try:
        yield
    finally:
        from hpc_kernels.cli import COMMANDS

        if "stop" in COMMANDS:
            # The instances' state lives in the workspace: `stop --all` stops exactly ours.
            subprocess.run(
                [*hpc_kernels_cmd(), "stop", "--all"], env=env, capture_output=True, timeout=120, check=False
            )
        for name in set(instance_names(env)) - before:
            if tag in name:
                subprocess.run(
                    [apptainer_binary(env), "instance", "stop", name],
                    env=env,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )


# ----------------------------------------------------------------------------- start latency


def bench_start(cfg: Config) -> list[Row]:
    """(1) exec vs seed, (2) instance vs exec and vs host: one interleaved run."""
    bench = "start→kernel_info"
    env = dict(os.environ)
    apptainer_binary(env)
    if not cfg.sif.is_file():
        raise NotAvailable(f"image {cfg.sif} missing")
    tag = f"hpckbench{os.getpid()}"
    instance_kernel = f"{tag}-inst"
    setup_kernelspecs(cfg, instance_kernel)
    variants = {
        "exec": lambda: start_to_reply(EXEC),
        "seed": lambda: start_to_reply(SEED),
        "host": lambda: start_to_reply(HOST),
        "argv": lambda: start_to_reply(ARGV),
    }
    have_instance = instance_mode_available()
    with our_instances_stopped(tag):
        if have_instance:
            # Warm the instance: the first kernel starts it; the measured ones attach to it.
            start_to_reply(instance_kernel)
            variants["instance"] = lambda: start_to_reply(instance_kernel)
        res = interleaved(variants, cfg.reps, cfg.warmup)
    rows = [
        ratio_row(bench, "ours, exec mode (hpc-kernels install)", res["exec"], "seed", res["seed"], 1.03),
        base_row(bench, "seed kernel.json (apptainer exec --bind)", res["seed"]),
        base_row(bench, "host ipykernel (floor)", res["host"]),
        # Splits ours/seed into the launcher's part and the apptainer argv's part, on real kernels.
        ratio_row(bench, "our apptainer argv without the launcher (hand-written kernel.json)", res["argv"],
                  "seed", res["seed"]),
    ]
    if have_instance:
        rows += [
            ratio_row(
                bench, "ours, instance mode (warm) vs exec", res["instance"], "exec", res["exec"], 0.65
            ),
            ratio_row(bench, "ours, instance mode (warm) vs host", res["instance"], "host", res["host"], 1.6),
        ]
    else:
        rows += [
            na_row(bench, "ours, instance mode (warm) vs exec", "instance mode not available", "≤ 0.65x"),
            na_row(bench, "ours, instance mode (warm) vs host", "instance mode not available", "≤ 1.6x"),
        ]
    rows += launcher_overhead(cfg, res["seed"])
    return rows


def launcher_overhead(cfg: Config, seed_starts: list[float]) -> list[Row]:
    """What the launcher adds, without the kernel's noise: the same ``apptainer exec`` of ``python3 -c pass``
    run by our launcher, by its argv directly, and in the seed's form; plus launcher → /bin/true."""
    from hpc_kernels.launch import plan
    from hpc_kernels.launchspec import read_kernel_json

    bench = "launcher overhead"
    spec_file = str(kernels_dir() / PASS / "kernel.json")
    cf = cfg.work / "overhead-connection.json"
    cf.write_text("{}", encoding="utf-8")
    cf.chmod(0o600)
    _data, spec = read_kernel_json(spec_file)
    argv, argv_env, _warnings = plan(spec, str(cf))
    seed = [
        "apptainer",
        "exec",
        "--bind",
        f"{cf}:/tmp/connection_file",
        str(cfg.sif),
        "python3",
        "-c",
        "pass",
    ]
    # The kernelspec's own argv, so this measures the launcher exactly as Jupyter starts it.
    launcher = [str(cf) if a == "{connection_file}" else a for a in _data["argv"]]
    env = dict(os.environ)
    true_env = dict(env, HPC_KERNELS_APPTAINER="/bin/true")
    res = interleaved(
        {
            "launcher": lambda: timed_run(launcher, env),
            "argv": lambda: timed_run(argv, argv_env),
            "seed": lambda: timed_run(seed, env),
            "true": lambda: timed_run(["/bin/true"], env),
            "launcher-true": lambda: timed_run(launcher, true_env),
        },
        max(cfg.reps * 2, 3),
        cfg.warmup,
    )
    added = median(res["launcher-true"]) - median(res["true"])
    return [
        base_row(bench, "seed argv: apptainer exec --bind … python3 -c pass", res["seed"]),
        ratio_row(
            bench,
            "our apptainer argv (--cleanenv, env, bind :rw), same command",
            res["argv"],
            "seed",
            res["seed"],
        ),
        ratio_row(bench, "our launcher → that argv", res["launcher"], "seed", res["seed"]),
        Row(
            bench,
            "launcher → exec /bin/true, minus /bin/true",
            added,
            "s",
            len(res["launcher-true"]),
            spread(res["launcher-true"]),
            added / median(seed_starts),
            "seed kernel start",
            "",
            None,
            "the launcher's own cost (Python start + imports) as a share of a kernel start",
        ),
    ]


# ----------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(roots: list[int]) -> set[int]:
    """``roots`` and all their descendants."""
    kids = _children()
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += kids.get(pid, [])
    return seen


def pss_mib(pids: set[int]) -> tuple[float, dict[str, float]]:
    """Sum of ``Pss`` (smaps_rollup) over ``pids`` in MiB (shared pages split between sharers), by program."""
    total_kb = 0
    by_name: dict[str, float] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kb = int(line.split()[1])
                    total_kb += kb
                    by_name[name] = by_name.get(name, 0.0) + kb / 1024
                    break
        except OSError:
            continue
    return total_kb / 1024, by_name


def processes_mentioning(text: str) -> list[int]:
    """Pids (but ours) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text in raw.replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry))
    return found


def helpers() -> list[int]:
    """Other processes working for our kernels (e.g. an instance reaper): their command line names the
    workspace (its HOME holds their state), but they are not children of the kernels' launchers."""
    return processes_mentioning(os.environ["HOME"])


def kernels_pss(name: str, n: int, extra_roots: list[int] | None = None,
                related: Callable[[], list[int]] | None = None) -> tuple[float, str]:
    """Start ``n`` kernels of ``name`` together, wait for all, and sum the PSS of their process trees,
    plus ``extra_roots`` and whatever ``related()`` finds (default: our helper processes)."""
    ks = [Kernel(name) for _ in range(n)]
    try:
        for k in ks:
            k.start()
        for k in ks:
            k.wait_reply(timeout=180)
        time.sleep(1.0)  # let lazily-started threads (heartbeat, history) settle
        roots = [p for p in (k.pid() for k in ks) if p] + list(extra_roots or []) + (related or helpers)()
        pids = tree(roots)
        total, by_name = pss_mib(pids)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]))
        return total, f"{len(pids)} processes: {parts} MiB"
    finally:
        for k in ks:
            k.stop()


def bench_memory(cfg: Config) -> list[Row]:
    """(4) total PSS of N kernels: exec vs instance mode (vs host ipykernels as the floor)."""
    n = 2 if cfg.quick else 8
    bench = f"memory: PSS of {n} kernels"
    env = dict(os.environ)
    apptainer_binary(env)
    tag = f"hpckbench{os.getpid()}m"
    instance_kernel = f"{tag}-inst"
    setup_kernelspecs(cfg, instance_kernel)
    exec_mib, exec_procs = kernels_pss(EXEC, n)
    host_mib, host_procs = kernels_pss(HOST, n)
    rows = [
        Row(bench, "ours, exec mode", exec_mib, "MiB", 1, exec_procs, 1.0, "(baseline)"),
        Row(
            bench,
            "host ipykernel (floor)",
            host_mib,
            "MiB",
            1,
            host_procs,
            host_mib / exec_mib if exec_mib else None,
            "exec",
        ),
    ]
    if instance_mode_available():
        with our_instances_stopped(tag):
            start_to_reply(instance_kernel)  # warm instance
            inst_pids = [pid for name, pid in instance_names(env).items() if tag in name]
            mib, procs = kernels_pss(instance_kernel, n, inst_pids)
        rows.append(
            Row(
                bench,
                "ours, instance mode (incl. the instance)",
                mib,
                "MiB",
                1,
                procs,
                mib / exec_mib if exec_mib else None,
                "exec",
            )
        )
    else:
        rows.append(na_row(bench, "ours, instance mode (incl. the instance)", "instance mode not available"))
    return rows
