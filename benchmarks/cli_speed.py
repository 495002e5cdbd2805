"""CLI responsiveness (``--version``/``--help`` vs ``python -c pass``) and scale (``list`` over 500
kernels, a no-op ``build --all`` over 50 up-to-date kernels, with a fake ``apptainer`` on PATH that
records any invocation: there must be none).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    Row,
    base_row,
    hpc_kernels_cmd,
    interleaved,
    median,
    ratio_row,
    run_cli,
    spread,
    timed_run,
)

FAKE_RUNTIME = """#!/bin/sh
# A stand-in for {name}: records that it was called, and fails.
echo "{name} $*" >> '{log}'
exit 1
"""


class FakeBuilder:
    """Writes a placeholder image, so the real build code records real stamps without running Apptainer."""

    name = "fake"

    def version(self) -> str:
        """Not a real runtime."""
        return "fake 0"

    def build(self, recipe: Path, dest: Path, options: list[str], on_line: object) -> None:
        """A few bytes stand in for the image."""
        dest.write_bytes(b"not an image\n")


def make_registry(root: Path, n: int, sif: Path) -> Path:
    """A registry of ``n`` kernels, each with its own small recipe (a ``localimage`` on ``sif``)."""
    recipes = root / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    lines = ["defaults:", "  images_dir: images", f"  command: {json.dumps(KERNEL_COMMAND)}", "kernels:"]
    for i in range(n):
        name = f"k{i:04d}"
        (recipes / f"{name}.def").write_text(
            f"Bootstrap: localimage\nFrom: {sif}\n\n%post\n    echo 'kernel {name}' > /etc/hpck-bench\n",
            encoding="utf-8",
        )
        lines += [f"  {name}:", f"    def: recipes/{name}.def", f"    display_name: Bench kernel {i}"]
    path = root / "kernels.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stamp_all(registry: Path) -> None:
    """Build every kernel with :class:`FakeBuilder` through ``hpc_kernels.build`` (real stamps)."""
    from hpc_kernels import registry as reg_mod
    from hpc_kernels.build import orchestrator

    for entry in reg_mod.load_file(registry).kernels:
        entry.image.parent.mkdir(parents=True, exist_ok=True)
        orchestrator.build(entry, builder=FakeBuilder(), check=False)  # a placeholder is no image to look into


def fake_runtime_path(work: Path) -> tuple[Path, Path]:
    """A directory with recording ``apptainer``/``singularity`` stand-ins, and their log."""
    fakebin = work / "fakebin"
    fakebin.mkdir(parents=True, exist_ok=True)
    log = work / "fake-runtime-calls.log"
    log.write_text("", encoding="utf-8")
    for name in ("apptainer", "singularity"):
        script = fakebin / name
        script.write_text(FAKE_RUNTIME.format(name=name, log=log), encoding="utf-8")
        script.chmod(0o755)
    return fakebin, log


def bench_cli(cfg: Config) -> list[Row]:
    """(3) --version/--help vs python -c pass; list over 500; no-op build --all over 50."""
    env = dict(os.environ)
    hk = hpc_kernels_cmd()
    n_list, n_build = (50, 10) if cfg.quick else (500, 50)
    reps = max(cfg.reps * 2, 3)

    # Scale fixtures: their own Jupyter dir, fake runtimes first on PATH.
    list_root, build_root = cfg.work / "scale-list", cfg.work / "scale-build"
    list_reg = make_registry(list_root, n_list, cfg.sif)
    build_reg = make_registry(build_root, n_build, cfg.sif)
    stamp_all(list_reg)
    stamp_all(build_reg)
    fakebin, calls = fake_runtime_path(cfg.work)
    scale_env = dict(env)
    scale_env["PATH"] = f"{fakebin}{os.pathsep}{env['PATH']}"
    scale_env["JUPYTER_DATA_DIR"] = str(cfg.work / "scale-jupyter")
    # Every listed kernel installed too: `list` then also reads 500 kernel.json files.
    run_cli(["install", "--registry", str(list_reg), "--all", "--json"], scale_env)
    out = json.loads(run_cli(["build", "--registry", str(build_reg), "--all", "--json"], scale_env))
    not_noop = [r for r in out if r.get("action") != "up-to-date"]
    if not_noop:
        raise RuntimeError(f"build --all was not a no-op: {not_noop[:3]}")
    listed = json.loads(run_cli(["list", "--registry", str(list_reg), "--json"], scale_env))
    if len(listed["kernels"]) != n_list or any(k["image_state"] != "built" for k in listed["kernels"]):
        raise RuntimeError("list did not report every kernel as built")

    py = [sys.executable]
    res = interleaved(
        {
            "pass": lambda: timed_run([*py, "-c", "pass"], env),
            "version": lambda: timed_run([*hk, "--version"], env),
            "help": lambda: timed_run([*hk, "--help"], env),
            "list": lambda: timed_run([*hk, "list", "--registry", str(list_reg)], scale_env),
            "build": lambda: timed_run([*hk, "build", "--registry", str(build_reg), "--all"], scale_env),
        },
        reps,
        cfg.warmup,
    )
    invocations = [ln for ln in calls.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bench = "CLI"
    rows = [
        base_row(bench, "python -c pass", res["pass"]),
        ratio_row(bench, "hpc-kernels --version", res["version"], "python -c pass", res["pass"], 3),
        ratio_row(bench, "hpc-kernels --help", res["help"], "python -c pass", res["pass"], 3),
        absolute_row(
            "scale", f"hpc-kernels list ({n_list} kernels, all installed)", res["list"], 0.3, res["pass"]
        ),
        absolute_row(
            "scale", f"hpc-kernels build --all ({n_build} up to date)", res["build"], 0.5, res["pass"]
        ),
        Row(
            "scale",
            f"apptainer/singularity runs during {reps + cfg.warmup + 1} no-op builds",
            float(len(invocations)),
            "calls",
            1,
            "",
            None,
            "",
            "= 0",
            not invocations,
            "recorded by fake apptainer/singularity first on PATH",
        ),
    ]
    return rows


def absolute_row(bench: str, variant: str, xs: list[float], limit: float, base: list[float]) -> Row:
    """A row with an absolute target (seconds), and its ratio to ``python -c pass`` for scale."""
    m = median(xs)
    return Row(
        bench,
        variant,
        m,
        "s",
        len(xs),
        spread(xs),
        m / median(base),
        "python -c pass",
        f"≤ {limit:g} s",
        m <= limit,
    )
