"""The registry's ``slurm:`` settings (validation, precedence, job arrays), ``--wait-timeout`` and
``jobs --prune`` without a cluster. On a real Slurm: tests/real/test_slurm.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, registry, slurm, slurm_records, slurm_submit
from hpc_kernels.adapters import slurm as adapter
from hpc_kernels.errors import HpcKernelsError, RegistryError
from hpc_kernels.model import SlurmFlags, SlurmSettings
from hpc_kernels.slurm_settings import mem_megabytes, time_minutes

DEF = {"a.def": "Bootstrap: scratch\n"}


def load(make_registry: Any, text: str) -> registry.Registry:
    return registry.load(make_registry(text, DEF))


def problems(make_registry: Any, text: str) -> list[str]:
    with pytest.raises(RegistryError) as info:
        load(make_registry, text)
    return [p.split("kernels.yaml:", 1)[1] for p in info.value.problems]  # type: ignore[attr-defined]


def test_slurm_formats() -> None:
    assert time_minutes("60") == 60 and time_minutes("1:00:00") == 60 and time_minutes("1-00:00:00") == 1440
    assert time_minutes("30:00") == 30 and time_minutes("2-12") == 3600 and time_minutes("1-02:30") == 1590
    assert time_minutes("1h") is None and time_minutes("soon") is None and time_minutes("1:2:3:4") is None
    assert mem_megabytes("4G") == 4096 and mem_megabytes("500") == 500 and mem_megabytes("1t") == 1048576
    assert mem_megabytes("4GB") is None and mem_megabytes("0") is None


def test_kernel_settings_override_defaults_key_by_key(make_registry: Any) -> None:
    reg = load(make_registry, """\
        defaults:
          slurm:
            account: def-lab
            time: 1:00:00      # unquoted: YAML 1.1 would read the integer 3600
            mem: 8G
            modules: [apptainer/1.3.5]
        kernels:
          a:
            def: a.def
            slurm: {time: 90, cpus: 4, extra_args: ["--qos=normal"]}
          b:
            def: a.def
        """)
    a, b = reg.get("a").slurm, reg.get("b").slurm
    assert a == SlurmSettings(account="def-lab", time="90", mem="8G", cpus=4,
                              modules=("apptainer/1.3.5",), extra_args=("--qos=normal",))
    assert b == SlurmSettings(account="def-lab", time="1:00:00", mem="8G", modules=("apptainer/1.3.5",))


def test_bad_settings_name_file_and_line(make_registry: Any) -> None:
    found = problems(make_registry, """\
        defaults:
          slurm:
            time: 1h
            partiton: cpu
        kernels:
          a:
            def: a.def
            slurm:
              cpus: two
              mem: 4GB
              modules: apptainer
              extra_args: ["--time=5", "--qos=normal"]
          b:
            def: a.def
            slurm: [time, 5]
          c:
            def: a.def
            slurm: {time: "0", account: "def lab"}
        """)
    assert found == [
        "3: 'slurm: time' in defaults must be minutes or [D-]HH:MM:SS, e.g. 60, \"1:00:00\" or "
        "\"1-00:00:00\", not '1h'.",
        "4: unknown key 'partiton' in the slurm settings of defaults (did you mean 'partition'?).",
        "9: 'slurm: cpus' in kernel 'a' must be a whole number of CPUs (>= 1), not 'two'.",
        "10: 'slurm: mem' in kernel 'a' must be a size like \"4G\", \"500M\" or 4000 (megabytes), not '4GB'.",
        "11: 'slurm: modules' in kernel 'a' must be a list of module names (e.g. [apptainer], or [] to load "
        "none), not 'apptainer'.",
        "12: 'slurm: extra_args' in kernel 'a' cannot set --time: use the 'time' key.",
        "15: 'slurm' in kernel 'b' must be a mapping (keys: account, time, mem, cpus, partition, modules, "
        "extra_args), not a list.",
        "18: 'slurm: account' in kernel 'c' must be a name without spaces, quotes, backslashes, '#' or control "
        "characters, not 'def lab'.",
        "18: 'slurm: time' in kernel 'c' must be minutes or [D-]HH:MM:SS, e.g. 60, \"1:00:00\" or "
        "\"1-00:00:00\", not '0'.",
    ]


def test_bad_settings_exit_1_with_one_sentence(make_registry: Any) -> None:
    path = make_registry("kernels:\n  a:\n    def: a.def\n    slurm: {time: 1 hour}\n", DEF)
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "build", "a", "--slurm", "--dry-run",
                           "--registry", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{path}:4: 'slurm: time' in kernel 'a' must be minutes or [D-]HH:MM:SS" in done.stderr


def test_precedence_flag_kernel_defaults_builtin(make_registry: Any) -> None:
    reg = load(make_registry, """\
        defaults:
          slurm: {time: "2:00:00", partition: cpu}
        kernels:
          a:
            def: a.def
            slurm: {mem: 16G}
          plain:
            def: a.def
        """)
    a = [reg.get("a")]
    opts = slurm.job_options(a)
    assert (opts.time, opts.mem, opts.cpus, opts.partition) == ("2:00:00", "16G", slurm.DEFAULT_CPUS, "cpu")
    # Registry values go on sbatch's command line (SBATCH_* variables do not beat them); built-ins do not.
    assert opts.sbatch_args() == ["--time=2:00:00", "--mem=16G", "--partition=cpu"]
    flagged = slurm.job_options(a, SlurmFlags(time="30", mem="1G", cpus=1, partition="debug"))
    assert (flagged.time, flagged.mem, flagged.cpus, flagged.partition) == ("30", "1G", 1, "debug")
    bare = slurm.job_options([registry.load(make_registry("kernels:\n  p:\n    def: a.def\n", DEF)).get("p")])
    assert (bare.time, bare.mem, bare.cpus, bare.account) == (slurm.DEFAULT_TIME, slurm.DEFAULT_MEM,
                                                               slurm.DEFAULT_CPUS, None)
    assert bare.sbatch_args() == [] and bare.modules == ("apptainer",) and not bare.require_modules


def test_job_array_takes_the_largest_request(make_registry: Any) -> None:
    reg = load(make_registry, """\
        defaults:
          slurm: {account: def-lab, modules: [apptainer]}
        kernels:
          small:
            def: a.def
            slurm: {time: "1-00:00:00", mem: 500M, cpus: 1}
          big:
            def: a.def
            slurm: {time: "3:00:00", mem: 2G, cpus: 8, extra_args: ["--qos=normal"]}
        """)
    small, big = reg.get("small"), reg.get("big")
    with pytest.raises(HpcKernelsError) as info:
        slurm.job_options([small, big])
    assert str(info.value) == (
        "the kernels of one job array must share their slurm 'extra_args', but they differ "
        "(small: not set; big: [--qos=normal]): build them with separate 'hpc-kernels build --slurm' commands."
    )
    import dataclasses

    big = dataclasses.replace(big, slurm=dataclasses.replace(big.slurm, extra_args=None))
    opts = slurm.job_options([small, big])
    assert (opts.time, opts.mem, opts.cpus, opts.account) == ("1-00:00:00", "2G", 8, "def-lab")
    assert opts.require_modules and opts.modules == ("apptainer",)
    plan = slurm.plan_build([small, big], reg.path, opts, apptainer_dir="")
    for line in ("#SBATCH --time=1-00:00:00", "#SBATCH --mem=2G", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --account=def-lab", "#SBATCH --array=0-1", "modules=(apptainer)", "require_modules=1"):
        assert line in plan.script


def test_conflicting_accounts_are_refused_in_one_sentence(make_registry: Any) -> None:
    path = make_registry("""\
        kernels:
          a:
            def: a.def
            slurm: {account: def-alice}
          b:
            def: a.def
            slurm: {account: def-bob, partition: gpu}
          c:
            def: a.def
        """, DEF)
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "build", "a", "b", "c", "--slurm", "--dry-run",
                           "--registry", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == (
        "hpc-kernels: error: the kernels of one job array must share their slurm 'account', but they differ "
        "(a: def-alice; b: def-bob): pass --account to use one for all, or build them with separate "
        "'hpc-kernels build --slurm' commands.\n"
    )
    reg = registry.load(path)
    opts = slurm.job_options(reg.select(["a", "b"], False), SlurmFlags(account="def-pi"))
    assert opts.account == "def-pi" and opts.partition == "gpu"  # b's partition: nobody disagrees


def test_dry_run_shows_registry_settings(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry("""\
        defaults:
          slurm: {time: 45, modules: [], extra_args: ["--constraint=cascade"]}
        kernels:
          a:
            def: a.def
        """, DEF)
    assert cli.main(["build", "a", "--slurm", "--dry-run", "--then-install", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# submit with: sbatch --parsable --time=45 --constraint=cascade <this script>" in out
    assert "#SBATCH --time=45\n" in out and "modules=()\n" in out
    # The install job is small and gets no extra_args (a --gres for the build is not wanted there).
    assert "#SBATCH --time=0:10:00" in out and out.count("--constraint=cascade") == 1


class Frozen(adapter.Slurm):
    """A Slurm that says every job is still running, and knows nothing else."""

    def queue(self, job_ids: Any) -> dict[str, adapter.JobInfo]:
        return {j: adapter.JobInfo(j, "RUNNING", "", "", "squeue") for j in job_ids}

    def control(self, job_id: str) -> dict[str, adapter.JobInfo]:
        return {}

    def accounting(self, job_ids: Any) -> None:
        return None


class Forgetful(Frozen):
    def queue(self, job_ids: Any) -> dict[str, adapter.JobInfo]:
        return {}


def write_record(job: str, submitted_at: float, *, exit_code: int | None, log: Path | None = None,
                 kind: str = "build") -> Path:
    jobs = slurm.jobs_dir()
    jobs.mkdir(parents=True, exist_ok=True)
    log = log or slurm.logs_dir() / f"{kind}-{job}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("log\n")
    rec = {"generator": "hpc-kernels", "job_id": job, "kind": kind, "kernels": ["a"],
           "submitted_at": submitted_at, "tasks": [{"task_id": job, "kernel": "a", "log": str(log)}]}
    (jobs / f"{job}.json").write_text(json.dumps(rec))
    (jobs / f"{job}.sbatch").write_text("#!/bin/bash\n")
    if exit_code is not None:
        (jobs / f"{job}.exit").write_text(f"{exit_code}\n")
    return log


def test_wait_timeout_names_unfinished_jobs() -> None:
    write_record("71", time.time(), exit_code=None)
    with pytest.raises(slurm_records.WaitTimeoutError) as info:
        slurm_records.wait(["71"], timeout=0.2, interval=0.05, slurm=Frozen())
    assert str(info.value) == (
        "gave up waiting after 0.2 s; still not finished: 71 (build of a: RUNNING). The job(s) keep running "
        "(see 'hpc-kernels jobs'; cancel with 'scancel 71')."
    )
    opts = slurm.JobOptions(time="1:30:00")
    build = slurm_submit.SubmittedJob("1", "build", ("a",), (), Path("x"))
    install = slurm_submit.SubmittedJob("2", "install", ("a",), (), Path("y"), "1")
    assert slurm_submit.default_wait_timeout(opts, [build, install]) == 5400 + 600 + slurm_submit.WAIT_MARGIN


def test_prune_forgets_only_old_finished_jobs(tmp_path: Path) -> None:
    now = time.time()
    old = now - 10 * 86400
    old_log = write_record("10", old, exit_code=0)
    write_record("11", old, exit_code=None)  # still running (the fake squeue says so)
    fresh_log = write_record("12", now, exit_code=1)
    outside = write_record("13", old, exit_code=1, log=tmp_path / "elsewhere.out")  # a log we did not place
    foreign = slurm.jobs_dir() / "notes.json"
    foreign.write_text('{"mine": true}')
    pruned = slurm_submit.prune(7, slurm=Frozen())
    assert sorted(p.job_id for p in pruned) == ["10", "13"]
    left = sorted(p.name for p in slurm.jobs_dir().iterdir())
    assert left == ["11.json", "11.sbatch", "12.exit", "12.json", "12.sbatch", "notes.json"]
    assert not old_log.exists() and fresh_log.exists() and outside.exists()
    # Slurm forgot job 11 without an exit record: it counts as ended (UNKNOWN) and goes too.
    assert [p.job_id for p in slurm_submit.prune(7, slurm=Forgetful())] == ["11"]


def test_jobs_prune_cli(capsys: pytest.CaptureFixture[str]) -> None:
    write_record("20", time.time() - 3600, exit_code=0)
    assert cli.main(["jobs", "--prune"]) == 0
    assert "nothing to prune: no finished job submitted more than 7 day(s) ago" in capsys.readouterr().err
    assert cli.main(["jobs", "--prune", "--older-than", "0", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["job_id"] == "20" and len(row["removed"]) == 4
    assert slurm_records.load_records() == []


def test_usage_errors_of_new_flags(make_registry: Any) -> None:
    path = make_registry("kernels:\n  a:\n    def: a.def\n", DEF)
    for argv, message in (
        (["build", "a", "--slurm", "--wait-timeout", "0", "--registry", str(path)],
         "--wait-timeout must be a number of seconds > 0."),
        (["build", "a", "--wait-timeout", "5", "--registry", str(path)],
         "--wait-timeout only applies with --slurm (build in a Slurm job)."),
        (["jobs", "--older-than", "3"], "--older-than only applies with --prune."),
    ):
        done = subprocess.run([sys.executable, "-m", "hpc_kernels", *argv], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().endswith(f"hpc-kernels: error: {message}")


def test_commented_example_in_kernels_yaml_is_valid(tmp_path: Path) -> None:
    """The commented `slurm:` block of the shipped kernels.yaml, uncommented, loads as documented."""
    shipped = (Path(__file__).resolve().parents[2] / "kernels.yaml").read_text()
    lines, inside = [], False
    for line in shipped.splitlines():
        if line.startswith("  # slurm:"):
            inside = True
        elif inside and not line.startswith("  #   "):
            inside = False
        lines.append(line.replace("  # ", "  ", 1) if inside else line)
    (tmp_path / "defs").mkdir()
    (tmp_path / "defs" / "science.def").write_text("Bootstrap: scratch\n")
    (tmp_path / "kernels.yaml").write_text("\n".join(lines) + "\n")
    (science,) = registry.load_file(tmp_path / "kernels.yaml").kernels
    assert science.slurm == SlurmSettings(account="def-yourpi", time="1:00:00", mem="4G", cpus=2,
                                          partition="cpubase_bycore_b1", modules=("apptainer",), extra_args=())
