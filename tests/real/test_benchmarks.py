"""The benchmark command works end to end in --quick mode (it never asserts a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.apptainer
def test_quick_benchmarks_run_and_report_every_comparison(
    apptainer_bin: str, base_sif: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    # The benchmark's workspace goes under its --cache dir, in tmp_path: leftovers are then easy to spot.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--sif",
            str(base_sif),
            "--json",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hpc-kernels benchmarks" in proc.stdout  # the rich table was printed
    data = json.loads(out.read_text())
    rows = {(r["bench"], r["variant"]): r for r in data["rows"]}
    assert data["quick"] is True and data["machine"]["nproc"]

    # (1) ours vs the seed: both measured, ratio computed against the seed in the same run.
    ours = rows[("start→kernel_info", "ours, exec mode (hpc-kernels install)")]
    assert ours["n"] == data["reps"] and ours["value"] > 0 and ours["baseline"] == "seed"
    assert rows[("start→kernel_info", "host ipykernel (floor)")]["value"] > 0
    # (2) instance mode: measured when the branch has it, otherwise an explicit n/a (never a crash).
    inst = rows[("start→kernel_info", "ours, instance mode (warm) vs exec")]
    assert inst["value"] is not None or "n/a (instance mode not available)" in inst["note"]
    # (3) CLI and scale; the no-op builds ran no apptainer at all.
    assert rows[("CLI", "hpc-kernels --version")]["ratio"] > 0
    calls = next(
        r for (b, v), r in rows.items() if b == "scale" and v.startswith("apptainer/singularity runs")
    )
    assert calls["value"] == 0 and calls["ok"] is True
    assert any(b == "scale" and v.startswith("hpc-kernels list") for b, v in rows)
    # (4) memory, (6) every compression the registry accepts reached the SIF's squashfs.
    assert any(b.startswith("memory") and r["value"] for (b, _v), r in rows.items())
    checks = [r for (b, _v), r in rows.items() if b == "compression: build check"]
    assert len(checks) >= 4 and all(r["ok"] for r in checks), checks
    # (5) podman: measured where .ci/podman-setup.sh prepared it (the cleanup rows too), else an explicit n/a.
    podman = [r for (b, _v), r in rows.items() if b.startswith("podman")]
    assert podman and all(r["value"] is not None or r["note"].startswith("n/a") for r in podman), podman
    assert all(r["ok"] is not False for r in podman), podman  # our containers were removed
    # (7) staging: a second staging of the same inputs fetches nothing (its time is reported, not asserted).
    warm = rows.get(("staging", "second build (cache hit)"))
    if warm is not None:
        assert warm["value"] is not None and warm["note"] == "nothing fetched", warm
    else:
        assert rows[("staging", "(all)")]["note"].startswith("n/a"), rows
    # Nothing left running: no kernel (their connection files were in the workspace), no instance.
    instances = subprocess.run(
        [apptainer_bin, "instance", "list"], capture_output=True, text=True, timeout=60
    )
    assert "hpckbench" not in instances.stdout


# ----------------------------------------------------------------------------- the hot paths made faster


def test_registry_syntax_errors_keep_pyyaml_wording(make_registry: Callable[..., Path]) -> None:
    from hpc_kernels import registry
    from hpc_kernels.errors import RegistryError

    path = make_registry("kernels:\n\ta: 1\n")
    with pytest.raises(RegistryError) as info:
        registry.load_file(path)
    assert f"{path}:2: not valid YAML: found character '\\t' that cannot start any token." in str(info.value)


def test_list_of_a_big_registry_prints_every_kernel(
    make_registry: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc_kernels.cli import main

    n = 150
    body = "".join(f"  k{i:03d}:\n    image: /nonexistent/k{i:03d}.sif\n" for i in range(n))
    path = make_registry("kernels:\n" + body)
    assert main(["list", "--registry", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()  # piped: a header, then one line per kernel
    assert lines[0].split() == ["kernel", "runtime/mode", "image", "state", "installed"]
    rows = [ln.split() for ln in lines[1:]]
    assert [r[0] for r in rows] == [f"k{i:03d}" for i in range(n)]
    assert all(r[1:] == ["apptainer/exec", f"/nonexistent/{r[0]}.sif", "external-missing", "—"] for r in rows)
