"""What staging costs on the second build of a kernel (its inputs already in the cache): near zero.

A kernel from a requirement file (``base:`` the test image, ``requirements: six``) is staged once (cold: the
image's Python asked of the image, ``pip download`` of the wheels and of pip, from the index pip is configured
with), then again and again (warm: nothing fetched, only the cache read). Also, interleaved in the same run:
``hpc-kernels build NAME --slurm --dry-run`` (which stages, then prints what the job would build) with
``staging: auto`` against the same kernel with ``staging: never`` (no staging at all).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    NotAvailable,
    Row,
    apptainer_binary,
    base_row,
    interleaved,
    median,
    ratio_row,
    run_cli,
    spread,
)

#: A cache hit must stay this cheap (it reads a few small files and hashes the requirement file).
WARM_TARGET = 0.1


def _registry(root: Path, sif: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "requirements.txt").write_text("six\n", encoding="utf-8")
    lines = ["defaults:", f"  images_dir: {root / 'images'}", f"  command: {json.dumps(KERNEL_COMMAND)}",
             "kernels:"]
    for name, setting in (("staged", "auto"), ("plain", "never")):
        lines += [f"  {name}:", f"    base: {sif}", "    requirements: requirements.txt", f"    staging: {setting}"]
    path = root / "kernels.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bench_staging(cfg: Config) -> list[Row]:
    """Cold and warm staging of one kernel, and the CLI with and without staging."""
    import os

    from hpc_kernels import registry
    from hpc_kernels.staging import cache, inputs

    apptainer_binary(dict(os.environ))  # the image's Python is asked of the image
    if not cfg.sif.is_file():
        raise NotAvailable(f"test image {cfg.sif} missing")
    path = _registry(cfg.work / "staging", cfg.sif)
    entry = next(e for e in registry.load_file(path).kernels if e.name == "staged")
    t0 = time.perf_counter()
    try:
        first = inputs.stage(entry)
    except cache.StagingError as exc:
        raise NotAvailable(f"cannot stage here: {exc}") from None
    cold = time.perf_counter() - t0
    rows = [Row("staging", "first build (cold cache)", cold, "s", 1, "",
                note=f"fetched: {', '.join(first.fetched) or 'nothing'}")]
    warm: list[float] = []
    fetched: set[str] = set()
    for _ in range(max(cfg.reps, 3)):
        t0 = time.perf_counter()
        again = inputs.stage(entry)
        warm.append(time.perf_counter() - t0)
        fetched.update(again.fetched)
    value = median(warm)
    rows.append(Row("staging", "second build (cache hit)", value, "s", len(warm), spread(warm, "{:.4f}"),
                    value / cold if cold else None, "first build", f"≤ {WARM_TARGET:g} s",
                    value <= WARM_TARGET and not fetched,
                    "nothing fetched" if not fetched else f"fetched again: {', '.join(sorted(fetched))}"))

    times = interleaved({
        "never": lambda: _dry_run(path, "plain"),
        "auto": lambda: _dry_run(path, "staged"),
    }, cfg.reps, cfg.warmup)
    rows.append(base_row("staging: build --slurm --dry-run", "staging: never (no staging)", times["never"]))
    rows.append(ratio_row("staging: build --slurm --dry-run", "staging: auto, inputs staged (cache hit)",
                          times["auto"], "staging: never", times["never"], target=1.5))
    return rows


def _dry_run(registry: Path, kernel: str) -> float:
    import os

    t0 = time.perf_counter()
    run_cli(["build", kernel, "--slurm", "--dry-run", "--registry", str(registry)], dict(os.environ))
    return time.perf_counter() - t0
