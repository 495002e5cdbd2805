"""Shared pieces of the benchmarks: result rows, interleaved timing, an isolated workspace.

The machine these run on is shared and noisy, so every comparison is measured *in the same run*
with the variants interleaved (A B C A B C ...), and reported as medians with their spread.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

APPTAINER_DIR = "/opt/apptainer/bin"
DEFAULT_SIF = Path(os.environ.get("HPCK_TEST_BASE_SIF", "/var/cache/hpc-kernels-ci/base.sif"))
#: What the test image runs (it has python3, not python).
KERNEL_COMMAND = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


class NotAvailable(Exception):
    """A benchmark (or one of its variants) cannot run here; the message says why (shown as n/a)."""


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    bench: str
    variant: str
    value: float | None  # median (seconds, MiB...) or None when n/a
    unit: str
    n: int = 0
    spread: str = ""  # e.g. "p25-p75 2.10-2.31"
    ratio: float | None = None  # value / baseline value, both measured in this run
    baseline: str = ""
    target: str = ""  # e.g. "≤ 1.03x" or "≤ 0.3 s"
    ok: bool | None = None  # target met?
    note: str = ""


@dataclass
class Config:
    """What to run and how hard."""

    quick: bool
    reps: int  # repetitions per variant for timing benchmarks
    sif: Path
    work: Path  # temporary workspace (HOME, Jupyter dirs, registries)
    cache: Path  # kept between runs (built compression images)
    warmup: int = 1  # discarded rounds before the measured ones
    python: str = sys.executable
    notes: list[str] = field(default_factory=list)


def median(xs: Sequence[float]) -> float:
    """The median (the benchmarks' statistic: robust to other agents' bursts)."""
    return float(statistics.median(xs))


def spread(xs: Sequence[float], fmt: str = "{:.3f}") -> str:
    """Interquartile range as text, the noise figure reported beside each median."""
    if len(xs) < 4:
        return "min-max " + "-".join(fmt.format(v) for v in (min(xs), max(xs)))
    q = statistics.quantiles(xs, n=4)
    return "p25-p75 " + "-".join(fmt.format(v) for v in (q[0], q[2]))


def interleaved(
    variants: Mapping[str, Callable[[], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each variant ``reps`` times, round-robin (rotating the order), after ``warmup`` discarded rounds.

    Each callable returns the duration it measured (so it can exclude its own setup/teardown).
    """
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + reps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            value = variants[name]()
            if i >= warmup:
                out[name].append(value)
    return out


def timed_run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120) -> float:
    """Wall time of one program run (it must succeed)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return dt


def ratio_row(
    bench: str,
    variant: str,
    xs: Sequence[float],
    base_name: str,
    base: Sequence[float],
    target: float | None = None,
    unit: str = "s",
    note: str = "",
) -> Row:
    """A row whose ratio is this variant's median over the baseline's median (same run)."""
    m, b = median(xs), median(base)
    r = m / b if b else None
    if len(xs) == len(base) and len(xs) > 1 and all(base):
        # Interleaved rounds: the per-round ratio cancels slow drifts of the machine's load.
        paired = median([x / y for x, y in zip(xs, base)])
        note = f"paired {paired:.2f}x" + (f"; {note}" if note else "")
    return Row(
        bench,
        variant,
        m,
        unit,
        len(xs),
        spread(xs),
        r,
        base_name,
        f"≤ {target:g}x" if target is not None else "",
        (r <= target) if (target is not None and r is not None) else None,
        note,
    )


def base_row(bench: str, variant: str, xs: Sequence[float], unit: str = "s", note: str = "") -> Row:
    """The baseline's own row (ratio 1)."""
    return Row(bench, variant, median(xs), unit, len(xs), spread(xs), 1.0, "(baseline)", "", None, note)


def na_row(bench: str, variant: str, why: str, target: str = "") -> Row:
    """A variant that cannot be measured here."""
    return Row(bench, variant, None, "", 0, "", None, "", target, None, f"n/a ({why})")


def tool_env(work: Path) -> dict[str, str]:
    """An environment with Apptainer first on PATH and HOME/XDG/Jupyter dirs inside ``work``."""
    env = dict(os.environ)
    home = work / "home"
    env["HOME"] = str(home)
    for var, sub in (
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_DATA_HOME", ".local/share"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_CACHE_HOME", ".cache"),
    ):
        env[var] = str(home / sub)
    env["JUPYTER_DATA_DIR"] = str(home / ".local/share/jupyter")
    env["JUPYTER_CONFIG_DIR"] = str(home / ".jupyter")
    env["JUPYTER_RUNTIME_DIR"] = str(home / ".local/share/jupyter/runtime")
    env["IPYTHONDIR"] = str(home / ".ipython")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    for var in (
        "JUPYTER_PATH",
        "HPC_KERNELS_REGISTRY",
        "APPTAINER_BIND",
        "SINGULARITY_BIND",
        "HPC_KERNELS_APPTAINER",
        "HPC_KERNELS_IMAGES",
        "HPC_KERNELS_DATA",
        "HPC_KERNELS_STATE",
    ):
        env.pop(var, None)
    if Path(APPTAINER_DIR, "apptainer").exists():
        env["PATH"] = APPTAINER_DIR + os.pathsep + env.get("PATH", "")
    # The venv's bin (hpc-kernels, jupyter) even when the venv is not activated.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def apptainer_binary(env: Mapping[str, str]) -> str:
    """The real apptainer, or NotAvailable."""
    found = shutil.which("apptainer", path=env.get("PATH"))
    if not found:
        raise NotAvailable("apptainer not installed")
    return found


def hpc_kernels_cmd() -> list[str]:
    """The installed console script (what users run), else ``python -m hpc_kernels``."""
    script = Path(sys.executable).parent / "hpc-kernels"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hpc_kernels"]


def run_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 300) -> str:
    """Run ``hpc-kernels ARGS``; raise with its stderr on failure; return stdout."""
    proc = subprocess.run(
        hpc_kernels_cmd() + list(args), env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"hpc-kernels {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def write_json(path: Path, data: Any) -> None:
    """Write results as JSON (rows as plain dicts)."""

    def default(o: Any) -> Any:
        if isinstance(o, Row):
            return asdict(o)
        return str(o)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=default) + "\n", encoding="utf-8")
