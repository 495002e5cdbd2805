"""Slurm helpers without a cluster: parsing Slurm's answers, rendering batch scripts, CLI rules.

The behaviour on a real cluster is proven in tests/real/test_slurm.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, registry, slurm, slurm_records
from hpc_kernels.adapters import slurm as adapter
from hpc_kernels.templates import GENERATED_MARKER

REG = """\
defaults:
  images_dir: images
kernels:
  one:
    def: one.def
  two:
    def: one.def
"""
DEF = {"one.def": "Bootstrap: scratch\n%files\n    one.def /one.def\n"}


def test_rejection_is_one_sentence_with_a_fix() -> None:
    bad_time = "sbatch: error: Invalid --time specification\n"
    assert adapter.rejection_sentence(bad_time) == (
        "sbatch rejected the job: Invalid --time specification "
        "(give --time as minutes or [D-]HH:MM:SS, e.g. --time 1:00:00)."
    )
    partition = ("sbatch: error: invalid partition specified: nope\n"
                 "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    sentence = adapter.rejection_sentence(partition)
    assert sentence.startswith("sbatch rejected the job: invalid partition specified: nope (")
    assert "\n" not in sentence
    cpus = "sbatch: error: Batch job submission failed: More processors requested than permitted\n"
    assert adapter.rejection_sentence(cpus).endswith("(ask for less with --cpus and --mem).")


def test_parsers_read_what_slurm_prints() -> None:
    assert adapter.parse_parsable("123;cluster\n") == "123"
    with pytest.raises(adapter.SlurmError):
        adapter.parse_parsable("garbage")
    live = adapter.parse_squeue("7_0|RUNNING|None\n7_1|PENDING|Resources\n")
    assert live["7_0"].state == "RUNNING" and live["7_1"].reason == "Resources"
    shown = adapter.parse_scontrol(
        "JobId=9 ArrayJobId=7 ArrayTaskId=2 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0\n"
        "JobId=7 ArrayJobId=7 ArrayTaskId=3-4 JobState=PENDING Reason=None ExitCode=0:0\n"
        "JobId=12 JobName=y JobState=COMPLETED Reason=None ExitCode=0:0\n"
    )
    assert shown["7_2"].state == "FAILED" and shown["7_2"].exit_code == "1:0"
    assert shown["12"].state == "COMPLETED" and "7_3-4" not in shown and "7" not in shown
    acct = adapter.parse_sacct("12|CANCELLED by 0|0:15|None\n13_1|TIMEOUT|0:0|TimeLimit\n")
    assert acct["12"].state == "CANCELLED" and acct["13_1"].reason == "TimeLimit"


def test_build_script_follows_drac_advice(make_registry: Any) -> None:
    reg = registry.load(make_registry(REG, DEF))
    opts = slurm.JobOptions(time="30", mem="2G", cpus=1, account="def-pi", explicit=("time",))
    plan = slurm.plan_build(list(reg.kernels), reg.path, opts, python="/opt/py/bin/python3",
                            apptainer_dir="/opt/apptainer/bin")
    text = plan.script
    assert text.startswith("#!/bin/bash\n") and GENERATED_MARKER in text.splitlines()[1]
    for line in ("#SBATCH --time=30", "#SBATCH --mem=2G", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --account=def-pi", "#SBATCH --array=0-1", "kernels=(one two)",
                 "apptainer_dir=/opt/apptainer/bin", "modules=(apptainer)", "require_modules=0",
                 "unset APPTAINER_BIND SINGULARITY_BIND APPTAINER_BINDPATH SINGULARITY_BINDPATH"):
        assert line in text
    assert f'/opt/py/bin/python3 -m hpc_kernels build "$kernel" --registry {reg.path}\n' in text
    assert plan.output.endswith("build-%A_%a.out") and plan.array
    # Explicit flags also go on sbatch's command line (where SBATCH_* variables cannot override them).
    assert plan.sbatch_args == ("--time=30",)
    install = slurm.plan_install(["one", "two"], reg.path, opts, python="/opt/py/bin/python3")
    assert "#SBATCH --account=def-pi" in install.script and "#SBATCH --time=0:10:00" in install.script
    assert f"/opt/py/bin/python3 -m hpc_kernels install one two --registry {reg.path}" in install.script
    assert slurm.dependency_args("41") == ["--dependency=afterok:41", "--kill-on-invalid-dep=yes"]


def test_dry_run_prints_scripts_and_submits_nothing(
    make_registry: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    path = make_registry(REG, DEF)
    rc = cli.main(["build", "one", "--slurm", "--dry-run", "--then-install", "--force",
                   "--registry", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("#!/bin/bash") == 2 and "--dependency=afterok:<build job id>" in out
    # staging: auto (the default): the job builds from what was staged here, without network
    assert f"-m hpc_kernels build \"$kernel\" --registry {path} --force --offline\n" in out
    assert f"#SBATCH --time={slurm.DEFAULT_TIME}" in out
    assert not slurm.jobs_dir().exists()


def test_slurm_flags_without_slurm_are_a_usage_error(make_registry: Any) -> None:
    path = make_registry(REG, DEF)
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "build", "one", "--time", "10",
                           "--registry", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "hpc-kernels: error: --time only applies with --slurm (build in a Slurm job).")


def test_jobs_without_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["jobs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["jobs"]) == 0
    assert "no Slurm jobs submitted by hpc-kernels" in capsys.readouterr().err


def test_states_from_our_records_when_slurm_forgot(tmp_path: Path) -> None:
    """Exit records decide; a dependent install job of a failed build counts as cancelled."""

    class Forgetful(adapter.Slurm):
        def queue(self, job_ids: Any) -> dict[str, adapter.JobInfo]:
            return {}

        def control(self, job_id: str) -> dict[str, adapter.JobInfo]:
            return {}

        def accounting(self, job_ids: Any) -> None:
            return None

    jobs = slurm.jobs_dir()
    jobs.mkdir(parents=True)
    log = tmp_path / "build-5_1.out"
    log.write_text("hpc-kernels: building kernel 'b'\nFATAL: cp: cannot stat 'missing.txt'\n")
    for rec in (
        {"job_id": "5", "kind": "build", "submitted_at": 1.0, "tasks": [
            {"task_id": "5_0", "kernel": "a", "log": "x"},
            {"task_id": "5_1", "kernel": "b", "log": str(log)}]},
        {"job_id": "6", "kind": "install", "depends_on": "5", "submitted_at": 2.0,
         "tasks": [{"task_id": "6", "kernel": "a, b", "log": "y"}]},
    ):
        (jobs / f"{rec['job_id']}.json").write_text(json.dumps({"generator": "hpc-kernels", **rec}))
    (jobs / "5_0.exit").write_text("0\n")
    (jobs / "5_1.exit").write_text("1\n")
    rows = {r.task_id: r for r in slurm_records.statuses(slurm=Forgetful())}
    assert rows["5_0"].state == "COMPLETED"
    assert rows["5_1"].state == "FAILED" and "cannot stat 'missing.txt'" in rows["5_1"].log_tail
    assert rows["6"].state == "CANCELLED" and rows["6"].reason == "its build job 5 failed"


def test_scripts_are_valid_bash(make_registry: Any, tmp_path: Path) -> None:
    reg = registry.load(make_registry(REG, DEF))
    opts = slurm.JobOptions()
    scripts = {"build.sh": slurm.plan_build(list(reg.kernels), reg.path, opts, apptainer_dir="").script,
               "install.sh": slurm.plan_install(["one"], reg.path, opts).script}
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    example = Path(__file__).resolve().parents[2] / "slurm" / "build-kernel-images.sbatch"
    for path in [tmp_path / "build.sh", tmp_path / "install.sh", example]:
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{path}: {done.stderr}"
