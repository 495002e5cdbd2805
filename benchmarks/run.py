"""Run the benchmarks and print medians and same-run ratios.

    python -m benchmarks [--quick] [--only NAME ...] [--reps N] [--json OUT]

Everything runs in a throw-away workspace (its own HOME, XDG and Jupyter dirs) under
``$XDG_CACHE_HOME/hpc-kernels-bench/runs``; built compression images are cached beside it, so a re-run's
builds are no-ops.
Exit status: 0 when every benchmark ran (targets missed or not is reported, not failed), 1 when one
crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import DEFAULT_SIF, Config, NotAvailable, Row, na_row, tool_env, write_json

Bench = Callable[[Config], list[Row]]


def _benches() -> dict[str, Bench]:
    from benchmarks.cli_speed import bench_cli
    from benchmarks.compression import bench_compression
    from benchmarks.jobkernels import bench_jobkernel
    from benchmarks.kernels import bench_memory, bench_start
    from benchmarks.podman import bench_podman
    from benchmarks.staging import bench_staging

    return {
        "cli": bench_cli,
        "start": bench_start,
        "memory": bench_memory,
        "compression": bench_compression,
        "podman": bench_podman,
        "jobkernel": bench_jobkernel,
        "staging": bench_staging,
    }


NAMES = ("cli", "start", "memory", "compression", "podman", "jobkernel", "staging")


def machine(env: dict[str, str]) -> dict[str, str]:
    """What the figures were measured on."""
    info = {"nproc": str(os.cpu_count()), "python": platform.python_version(), "kernel": platform.release()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["load average (start)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    app = shutil.which("apptainer", path=env.get("PATH"))
    if app:
        info["apptainer"] = subprocess.run(
            [app, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["jupyter_client"] = importlib.metadata.version("jupyter_client")
    return info


def render(rows: list[Row], info: dict[str, str], seconds: float) -> None:
    """The results as a rich table (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="hpc-kernels benchmarks (medians; ratios measured in the same run, interleaved)",
        title_justify="left",
    )
    for col, just in (
        ("benchmark", "left"),
        ("variant", "left"),
        ("median", "right"),
        ("n", "right"),
        ("spread", "left"),
        ("ratio", "right"),
        ("vs", "left"),
        ("target", "left"),
        ("", "left"),
    ):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        value = (
            ""
            if r.value is None
            else (f"{r.value:.3f} {r.unit}" if r.unit in ("s", "ms") else f"{r.value:.1f} {r.unit}")
        )
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: ""}[r.ok]
        table.add_row(
            r.bench,
            r.variant,
            value or f"[dim]{r.note}[/]",
            str(r.n or ""),
            r.spread,
            ratio,
            r.baseline,
            r.target,
            verdict + (f" [dim]{r.note}[/]" if r.value is not None and r.note else ""),
        )
    console = Console(highlight=False, width=max(160, shutil.get_terminal_size().columns))
    console.print(table)
    console.print(
        "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + f"; run took {seconds:.0f} s"
    )


def _wait_for_helpers(work: Path, timeout: float = 30) -> None:
    """Let the kernels' helpers (instance reapers, container watchers) that keep state in the workspace
    finish, so that none writes into it again after it is removed."""
    from benchmarks.kernels import processes_mentioning

    deadline = time.monotonic() + timeout
    while processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_mentioning(str(work))
    if left:
        print(f"warning: {len(left)} helper process(es) still use {work}: {left}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the selected benchmarks in an isolated workspace, print and save results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions: proves it works")
    parser.add_argument(
        "--only",
        action="append",
        choices=NAMES,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(NAMES)}",
    )
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 10, --quick 2)")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--sif", type=Path, default=DEFAULT_SIF, help=f"the test image (default {DEFAULT_SIF})"
    )
    parser.add_argument("--cache", type=Path, help="where built compression images are kept between runs")
    args = parser.parse_args(argv)

    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = args.cache or Path(cache_home) / "hpc-kernels-bench"
    # The workspace lives under the cache dir, not /tmp: on a shared machine other people's /tmp sweeps
    # (rm -rf /tmp/hpck-*) have removed it mid-run.
    runs = cache.absolute() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    saved = dict(os.environ)
    env = tool_env(work)
    os.environ.clear()
    os.environ.update(env)
    cfg = Config(
        quick=args.quick,
        reps=args.reps or (2 if args.quick else 10),
        warmup=0 if args.quick else 1,  # --quick proves it works (CI budget): no discarded rounds
        sif=args.sif.absolute(),
        work=work,
        cache=cache.absolute(),
    )
    info = machine(env)
    rows: list[Row] = []
    crashed = False
    t0 = time.monotonic()
    try:
        benches = _benches()
        for name in args.only or NAMES:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                rows += benches[name](cfg)
            except NotAvailable as exc:
                rows.append(na_row(name, "(all)", str(exc)))
            except Exception as exc:
                crashed = True
                traceback.print_exc()
                rows.append(na_row(name, "(all)", f"crashed: {exc}"))
            print(f"{name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        _wait_for_helpers(work)
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - t0
    info["load average (end)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    from benchmarks.kernels import RETRIES  # (imported late: it needs jupyter_client, and only here)

    info["kernel starts retried"] = (", ".join(f"{k} {n}" for k, n in sorted(RETRIES.items()))
                                     if RETRIES else "none")
    render(rows, info, seconds)
    if args.json:
        write_json(
            args.json,
            {"machine": info, "quick": args.quick, "reps": cfg.reps, "seconds": seconds, "rows": rows},
        )
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
